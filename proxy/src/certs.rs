//! A development PKI: everything a single host needs to serve tenants over
//! mTLS, generated with rcgen (ECDSA P-256 everywhere).
//!
//! Two separate CAs, because the two trust decisions are separate: clients
//! trust the *server CA* to name the host, the proxy trusts the *tenant CA*
//! to name tenants (`tls.client_ca`). A third, *untrusted* CA issues a
//! client certificate with a valid SPIFFE id of the first tenant: the
//! certificate an impostor would hold, for refusal tests.
//!
//! Files written by [`DevPki::write_to`] (keys 0600, certificates 0644):
//!
//! | file | what | used as |
//! |---|---|---|
//! | `server-ca.pem` | server CA certificate | clients' trust root (`--ca`) |
//! | `server.pem`, `server.key` | server certificate for `localhost`, `127.0.0.1`, `::1` | `tls.cert`, `tls.key` |
//! | `tenant-ca.pem` | tenant CA certificate | `tls.client_ca` |
//! | `client-<tenant>.pem`, `client-<tenant>.key` | a tenant's client certificate, URI SAN `spiffe://<domain>/tenant/<tenant>` | client `--cert`, `--key` |
//! | `untrusted-ca.pem` | a CA the proxy does not trust | — |
//! | `untrusted-client.pem`, `untrusted-client.key` | the first tenant's SPIFFE id, issued by the untrusted CA | refusal tests |
//!
//! The CA keys are not written: to add a tenant, generate a new set.
//! Validity is rcgen's default (1975 to 4096): these are for development only.

use bulkhead_core::TenantId;
use bulkhead_core::identity::TrustDomain;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use std::collections::HashSet;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// File name of the server CA certificate.
pub const SERVER_CA_FILE: &str = "server-ca.pem";
/// File name of the server certificate.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the server key.
pub const SERVER_KEY_FILE: &str = "server.key";
/// File name of the tenant CA certificate.
pub const TENANT_CA_FILE: &str = "tenant-ca.pem";
/// File name of the untrusted CA certificate.
pub const UNTRUSTED_CA_FILE: &str = "untrusted-ca.pem";
/// File name of the untrusted client certificate.
pub const UNTRUSTED_CLIENT_CERT_FILE: &str = "untrusted-client.pem";
/// File name of the untrusted client key.
pub const UNTRUSTED_CLIENT_KEY_FILE: &str = "untrusted-client.key";
/// Names the server certificate is valid for.
pub const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// File name of a tenant's client certificate.
pub fn client_cert_file(tenant: &TenantId) -> String {
    format!("client-{tenant}.pem")
}

/// File name of a tenant's client key.
pub fn client_key_file(tenant: &TenantId) -> String {
    format!("client-{tenant}.key")
}

/// The SPIFFE id of a tenant: `spiffe://<domain>/tenant/<id>`.
pub fn spiffe_id(domain: &TrustDomain, tenant: &TenantId) -> String {
    format!("spiffe://{domain}/tenant/{tenant}")
}

/// Why a development PKI could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// No tenant was named.
    #[error("name at least one tenant")]
    NoTenants,
    /// A tenant was named twice.
    #[error("tenant {0} is named twice")]
    DuplicateTenant(TenantId),
    /// rcgen refused to make a certificate.
    #[error("generating {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// Files would be overwritten.
    #[error("{} already exist(s) in {}; pass --force to replace", names.join(", "), dir.display())]
    WouldOverwrite {
        /// The directory.
        dir: PathBuf,
        /// The files present.
        names: Vec<String>,
    },
    /// A file or the directory could not be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct CertAndKey {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl fmt::Debug for CertAndKey {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAndKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A whole development PKI, in memory.
#[derive(Clone, Debug)]
pub struct DevPki {
    /// The server CA certificate: what clients trust.
    pub server_ca_pem: String,
    /// The server certificate (for [`SERVER_NAMES`]) and key.
    pub server: CertAndKey,
    /// The tenant CA certificate: what the proxy trusts for client certificates.
    pub tenant_ca_pem: String,
    /// One client certificate per tenant, in the order named.
    pub clients: Vec<(TenantId, CertAndKey)>,
    /// A CA the proxy does not trust.
    pub untrusted_ca_pem: String,
    /// The first tenant's SPIFFE id, issued by the untrusted CA.
    pub untrusted_client: CertAndKey,
}

/// Generates a development PKI for `tenants` of trust domain `domain`.
pub fn generate(domain: &TrustDomain, tenants: &[TenantId]) -> Result<DevPki, CertsError> {
    let first = tenants.first().ok_or(CertsError::NoTenants)?;
    let mut seen = HashSet::new();
    if let Some(dup) = tenants.iter().find(|t| !seen.insert(*t)) {
        return Err(CertsError::DuplicateTenant(dup.clone()));
    }
    let server_ca = ca("bulkhead development server CA")?;
    let tenant_ca = ca("bulkhead development tenant CA")?;
    let untrusted_ca = ca("bulkhead development untrusted CA")?;
    let server = leaf(
        "server certificate",
        &server_ca,
        "localhost",
        SERVER_NAMES.map(str::to_owned).to_vec(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let client = |issuer: &Issuer, tenant: &TenantId| {
        let mut params = leaf_params(
            tenant.as_str(),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
        .map_err(|source| gen_error(format!("client certificate of {tenant}"), source))?;
        let uri = spiffe_id(domain, tenant)
            .as_str()
            .try_into()
            .map_err(|source| gen_error(format!("SPIFFE id of {tenant}"), source))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        sign(&format!("client certificate of {tenant}"), &params, issuer)
    };
    let clients = tenants
        .iter()
        .map(|t| Ok((t.clone(), client(&tenant_ca, t)?)))
        .collect::<Result<Vec<_>, CertsError>>()?;
    Ok(DevPki {
        server_ca_pem: server_ca.pem(),
        server,
        tenant_ca_pem: tenant_ca.pem(),
        clients,
        untrusted_ca_pem: untrusted_ca.pem(),
        untrusted_client: client(&untrusted_ca, first)?,
    })
}

impl DevPki {
    /// A tenant's client certificate and key.
    pub fn client(&self, tenant: &TenantId) -> Option<&CertAndKey> {
        self.clients
            .iter()
            .find_map(|(t, pair)| (t == tenant).then_some(pair))
    }

    /// Writes every file (see the module docs) into `dir`, creating it (0700)
    /// if needed, and returns their paths. Existing files are replaced only
    /// with `overwrite`; otherwise nothing is written.
    pub fn write_to(&self, dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>, CertsError> {
        let mut files: Vec<(String, &str, bool)> = vec![
            (SERVER_CA_FILE.to_owned(), &self.server_ca_pem, false),
            (SERVER_CERT_FILE.to_owned(), &self.server.cert_pem, false),
            (SERVER_KEY_FILE.to_owned(), &self.server.key_pem, true),
            (TENANT_CA_FILE.to_owned(), &self.tenant_ca_pem, false),
            (UNTRUSTED_CA_FILE.to_owned(), &self.untrusted_ca_pem, false),
            (
                UNTRUSTED_CLIENT_CERT_FILE.to_owned(),
                &self.untrusted_client.cert_pem,
                false,
            ),
            (
                UNTRUSTED_CLIENT_KEY_FILE.to_owned(),
                &self.untrusted_client.key_pem,
                true,
            ),
        ];
        for (tenant, pair) in &self.clients {
            files.push((client_cert_file(tenant), &pair.cert_pem, false));
            files.push((client_key_file(tenant), &pair.key_pem, true));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CertsError::Write {
                path: dir.to_owned(),
                source,
            })?;
        let present: Vec<String> = files
            .iter()
            .filter(|(name, ..)| dir.join(name).exists())
            .map(|(name, ..)| name.clone())
            .collect();
        if !present.is_empty() && !overwrite {
            return Err(CertsError::WouldOverwrite {
                dir: dir.to_owned(),
                names: present,
            });
        }
        files
            .iter()
            .map(|(name, contents, secret)| {
                let path = dir.join(name);
                write_file(&path, contents, *secret)
                    .map(|()| path.clone())
                    .map_err(|source| CertsError::Write { path, source })
            })
            .collect()
    }
}

/// Writes a new file; a key is created 0600 (removing any old file first,
/// since the mode applies only at creation).
fn write_file(path: &Path, contents: &str, secret: bool) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

type Issuer = CertifiedIssuer<'static, KeyPair>;

fn gen_error(what: impl Into<String>, source: rcgen::Error) -> CertsError {
    CertsError::Generate {
        what: what.into(),
        source,
    }
}

fn new_key(what: &str) -> Result<KeyPair, CertsError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| gen_error(format!("key of {what}"), e))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "bulkhead development");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A self-signed CA that may sign leaves only (path length 0).
fn ca(common_name: &str) -> Result<Issuer, CertsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, new_key(common_name)?)
        .map_err(|e| gen_error(common_name, e))
}

fn leaf_params(
    common_name: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn leaf(
    what: &str,
    issuer: &Issuer,
    common_name: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertAndKey, CertsError> {
    let params = leaf_params(common_name, names, usage).map_err(|e| gen_error(what, e))?;
    sign(what, &params, issuer)
}

fn sign(what: &str, params: &CertificateParams, issuer: &Issuer) -> Result<CertAndKey, CertsError> {
    let key = new_key(what)?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|e| gen_error(what, e))?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_core::identity::tenant_from_certificate;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;

    fn tenants(names: &[&str]) -> Vec<TenantId> {
        names.iter().map(|n| TenantId::new(n).unwrap()).collect()
    }

    #[test]
    fn client_certificates_name_their_tenant() {
        let domain = TrustDomain::new("bulkhead.test").unwrap();
        let pki = generate(&domain, &tenants(&["acme", "globex"])).unwrap();
        for (tenant, pair) in &pki.clients {
            let der = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap();
            assert_eq!(&tenant_from_certificate(&der, &domain).unwrap(), tenant);
        }
        let der = CertificateDer::from_pem_slice(pki.untrusted_client.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            tenant_from_certificate(&der, &domain).unwrap().as_str(),
            "acme"
        );
        assert!(!format!("{pki:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn refuses_empty_and_duplicate_tenant_lists() {
        let domain = TrustDomain::new("bulkhead.test").unwrap();
        assert!(matches!(generate(&domain, &[]), Err(CertsError::NoTenants)));
        assert!(matches!(
            generate(&domain, &tenants(&["a", "b", "a"])),
            Err(CertsError::DuplicateTenant(t)) if t.as_str() == "a"
        ));
    }

    #[test]
    fn writes_keys_0600_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("bulkhead-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let domain = TrustDomain::new("bulkhead.test").unwrap();
        let pki = generate(&domain, &tenants(&["acme"])).unwrap();
        let written = pki.write_to(&dir, false).unwrap();
        assert_eq!(written.len(), 9);
        let mode = |name: &str| {
            std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("client-acme.key"), 0o600);
        assert_eq!(mode(SERVER_KEY_FILE), 0o600);
        assert_eq!(mode(SERVER_CERT_FILE), 0o644);
        assert!(matches!(
            pki.write_to(&dir, false),
            Err(CertsError::WouldOverwrite { .. })
        ));
        pki.write_to(&dir, true).unwrap();
        assert_eq!(mode("client-acme.key"), 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
