//! Tenant identity from real X.509 certificates minted with rcgen: the
//! SPIFFE id in the `SubjectAltName` names the tenant, and every way a
//! certificate can fail to name exactly one tenant of our trust domain is
//! refused with its own error.

use bulkhead_core::TenantId;
use bulkhead_core::identity::{
    ApiKeyHash, ApiKeyRegistry, IdentityError, TenantApiKeys, TrustDomain, tenant_from_certificate,
};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, IsCa, Issuer, KeyPair, SanType,
    string::Ia5String,
};

const DOMAIN: &str = "bulkhead.test";

fn domain() -> TrustDomain {
    TrustDomain::new(DOMAIN).unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(Ia5String::try_from(s).unwrap())
}

/// A leaf certificate with these SANs, signed by a fresh tenant CA.
fn leaf(sans: Vec<SanType>) -> Vec<u8> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = Issuer::new(ca_params, KeyPair::generate().unwrap());
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans;
    let key = KeyPair::generate().unwrap();
    params.signed_by(&key, &ca).unwrap().der().to_vec()
}

/// A self-signed certificate whose only `SubjectAltName` extension is the raw
/// `GeneralNames` given, for encodings rcgen refuses to produce.
fn with_raw_san(general_names: &[u8], typed_sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = typed_sans;
    params
        .custom_extensions
        .push(CustomExtension::from_oid_content(
            &[2, 5, 29, 17],
            der_sequence(general_names),
        ));
    params
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

/// `[6] IMPLICIT IA5String`: a URI `GeneralName` with arbitrary bytes.
fn der_uri(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x86, u8::try_from(bytes.len()).unwrap()];
    out.extend_from_slice(bytes);
    out
}

fn der_sequence(content: &[u8]) -> Vec<u8> {
    let mut out = vec![0x30, u8::try_from(content.len()).unwrap()];
    out.extend_from_slice(content);
    out
}

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

#[test]
fn a_well_formed_svid_names_its_tenant() {
    let der = leaf(vec![
        dns("client.acme.example"),
        uri("https://acme.example/ignored"),
        uri("spiffe://bulkhead.test/tenant/acme"),
    ]);
    assert_eq!(tenant_from_certificate(&der, &domain()), Ok(tenant("acme")));
}

#[test]
fn another_trust_domain_is_refused_and_named() {
    let der = leaf(vec![uri("spiffe://evil.test/tenant/acme")]);
    let err = tenant_from_certificate(&der, &domain()).unwrap_err();
    assert_eq!(
        err,
        IdentityError::ForeignTrustDomain {
            id: "spiffe://evil.test/tenant/acme".into(),
            found: "evil.test".into(),
            expected: domain(),
        }
    );
    assert!(err.to_string().contains("\"evil.test\""), "{err}");
    assert_eq!(err.http_status(), 401);
}

#[test]
fn a_certificate_without_san_or_spiffe_id_names_no_tenant() {
    assert_eq!(
        tenant_from_certificate(&leaf(vec![]), &domain()),
        Err(IdentityError::NoSubjectAltName)
    );
    let dns_only = leaf(vec![dns("acme.bulkhead.test"), dns("bulkhead.test")]);
    assert_eq!(
        tenant_from_certificate(&dns_only, &domain()),
        Err(IdentityError::NoSpiffeId)
    );
    let https_only = leaf(vec![uri("https://bulkhead.test/tenant/acme")]);
    assert_eq!(
        tenant_from_certificate(&https_only, &domain()),
        Err(IdentityError::NoSpiffeId)
    );
}

#[test]
fn several_spiffe_ids_are_refused_and_listed_even_when_identical() {
    let cases = [
        [
            "spiffe://bulkhead.test/tenant/acme",
            "spiffe://bulkhead.test/tenant/globex",
        ],
        [
            "spiffe://bulkhead.test/tenant/acme",
            "spiffe://bulkhead.test/tenant/acme",
        ],
        [
            "spiffe://bulkhead.test/tenant/acme",
            "spiffe://evil.test/tenant/acme",
        ],
    ];
    for ids in cases {
        let der = leaf(ids.iter().map(|id| uri(id)).collect());
        let err = tenant_from_certificate(&der, &domain()).unwrap_err();
        assert_eq!(
            err,
            IdentityError::SeveralSpiffeIds(ids.iter().map(|id| (*id).to_owned()).collect())
        );
        for id in ids {
            assert!(err.to_string().contains(id), "{err}");
        }
    }
}

#[test]
fn malformed_spiffe_ids_are_refused_with_the_reason() {
    let malformed = [
        "SPIFFE://bulkhead.test/tenant/acme",
        "spiffe://BULKHEAD.test/tenant/acme",
        "spiffe://bulkhead.test/tenant/",
        "spiffe://bulkhead.test/tenant/a/b",
        "spiffe://bulkhead.test/tenant/acme?admin=1",
        "spiffe://bulkhead.test/tenant/acme#x",
        "spiffe://bulkhead.test/tenant/%61cme",
        "spiffe://bulkhead.test:8443/tenant/acme",
    ];
    for id in malformed {
        let err = tenant_from_certificate(&leaf(vec![uri(id)]), &domain()).unwrap_err();
        assert!(
            matches!(&err, IdentityError::MalformedSpiffeId { id: got, .. } if got == id),
            "{id}: {err:?}"
        );
        assert_eq!(err.http_status(), 401);
    }
    for id in [
        "spiffe://bulkhead.test/tenant/ACME",
        "spiffe://bulkhead.test/tenant/-acme",
        "spiffe://bulkhead.test/tenant/acme_corp",
        &format!("spiffe://bulkhead.test/tenant/{}", "a".repeat(64)),
    ] {
        let err = tenant_from_certificate(&leaf(vec![uri(id)]), &domain()).unwrap_err();
        assert!(
            matches!(err, IdentityError::InvalidTenantId { .. }),
            "{id}: {err:?}"
        );
    }
    let err = tenant_from_certificate(
        &leaf(vec![uri("spiffe://bulkhead.test/admin/root")]),
        &domain(),
    )
    .unwrap_err();
    assert!(matches!(err, IdentityError::NotATenant { .. }), "{err:?}");
}

#[test]
fn garbage_truncated_or_padded_der_is_not_a_certificate() {
    let good = leaf(vec![uri("spiffe://bulkhead.test/tenant/acme")]);
    let mut padded = good.clone();
    padded.push(0);
    for der in [
        &[][..],
        b"not a certificate",
        &[0x30, 0x82, 0xff, 0xff, 0x01],
        &good[..good.len() / 2],
        &padded,
    ] {
        let err = tenant_from_certificate(der, &domain()).unwrap_err();
        assert!(matches!(err, IdentityError::BadCertificate(_)), "{err:?}");
        assert_eq!(err.http_status(), 401);
    }
}

#[test]
fn a_second_san_extension_cannot_smuggle_in_another_tenant() {
    let der = with_raw_san(
        &der_uri(b"spiffe://bulkhead.test/tenant/evil"),
        vec![uri("spiffe://bulkhead.test/tenant/acme")],
    );
    assert!(matches!(
        tenant_from_certificate(&der, &domain()),
        Err(IdentityError::BadCertificate(_))
    ));
}

#[test]
fn an_unreadable_uri_san_fails_closed() {
    let der = with_raw_san(&der_uri(b"spiffe://bulkhead.test/tenant/\xff"), vec![]);
    assert!(matches!(
        tenant_from_certificate(&der, &domain()),
        Err(IdentityError::BadCertificate(_))
    ));
    // The raw encoding itself is sound: the same bytes as text name the tenant.
    let der = with_raw_san(&der_uri(b"spiffe://bulkhead.test/tenant/acme"), vec![]);
    assert_eq!(tenant_from_certificate(&der, &domain()), Ok(tenant("acme")));
}

#[test]
fn certificate_then_api_key_narrows_never_changes_the_tenant() {
    let registry = ApiKeyRegistry::new([
        TenantApiKeys {
            tenant: tenant("acme"),
            keys: vec![ApiKeyHash::of("sk-acme")],
            require_api_key: true,
        },
        TenantApiKeys {
            tenant: tenant("globex"),
            keys: vec![ApiKeyHash::of("sk-globex")],
            require_api_key: false,
        },
    ])
    .unwrap();
    let der = leaf(vec![uri("spiffe://bulkhead.test/tenant/acme")]);
    let cert_tenant = tenant_from_certificate(&der, &domain()).unwrap();
    let id = registry
        .authenticate(&cert_tenant, Some("sk-acme"))
        .unwrap();
    assert_eq!(id.tenant(), &tenant("acme"));
    let err = registry
        .authenticate(&cert_tenant, Some("sk-globex"))
        .unwrap_err();
    assert!(matches!(err, IdentityError::ForeignApiKey { .. }));
    assert_eq!(err.http_status(), 403);
    assert_eq!(
        registry.authenticate(&cert_tenant, None),
        Err(IdentityError::MissingApiKey {
            tenant: tenant("acme")
        })
    );
}
