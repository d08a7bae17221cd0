//! TLS for the front door: the server configurations of both listeners,
//! built from the `[tls]` PEM files, and the tenant of a verified peer.
//!
//! Both listeners share one policy: TLS 1.3 only, the ring provider (passed
//! explicitly, never installed as the process default, so no other crate's
//! choice can change it), a client certificate *required* and verified
//! against the configured tenant CAs, and no 0-RTT (early data is
//! replayable, and a replayed inference request costs GPU time). They differ
//! only in ALPN: `h2`/`http/1.1` on TCP, `h3` on QUIC.
//!
//! Verification happens inside the handshake: a client without a
//! certificate from a tenant CA never completes it, so it never reaches a
//! request handler. What the certificate *says* (its SPIFFE id) is read
//! afterwards by [`tenant_of_chain`].

mod pem;

use bulkhead_core::TenantId;
use bulkhead_core::config::TlsPaths;
use bulkhead_core::identity::{IdentityError, TrustDomain, tenant_from_certificate};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// ALPN protocols offered on the TLS/TCP listener, most preferred first.
pub const TCP_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// ALPN protocol of the QUIC listener.
pub const QUIC_ALPN: [&[u8]; 1] = [b"h3"];

/// Why a TLS configuration could not be built. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not well-formed PEM.
    #[error("{} is not valid PEM: {reason}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong (never quotes the file's contents).
        reason: String,
    },
    /// The file holds no `CERTIFICATE` block.
    #[error("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key block.
    #[error("{} holds no PEM private key (PKCS#8, SEC1 or PKCS#1)", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key is not one the ring provider can sign with.
    #[error("the private key in {} is not usable: {reason}", path.display())]
    UnusableKey {
        /// The key file.
        path: PathBuf,
        /// The provider's reason.
        reason: String,
    },
    /// The private key is not the key of the chain's first certificate.
    #[error(
        "the private key in {} does not match the first certificate in {}",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate chain file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The server certificate chain was refused.
    #[error("the certificate chain in {} is not usable: {reason}", path.display())]
    BadServerCertificate {
        /// The chain file.
        path: PathBuf,
        /// rustls's reason.
        reason: String,
    },
    /// A client CA certificate is not usable as a trust anchor.
    #[error("client CA {}: certificate #{index} is not a usable trust anchor: {reason}", path.display())]
    BadClientCa {
        /// The CA file.
        path: PathBuf,
        /// Which certificate of the file, from 1.
        index: usize,
        /// webpki's reason.
        reason: String,
    },
    /// `tls.client_ca` names no file: client certificates could not be verified.
    #[error("tls.client_ca names no CA file; client certificates are required and need one")]
    NoClientCa,
}

/// The server configurations of both listeners, built from one set of files.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// For the TLS/TCP listener: ALPN [`TCP_ALPN`].
    pub tcp: Arc<ServerConfig>,
    /// For the QUIC listener: ALPN [`QUIC_ALPN`].
    pub quic: Arc<ServerConfig>,
}

impl ServerTls {
    /// Reads the server chain, its key and the client CAs named by `paths`.
    ///
    /// Fails if a file is missing or malformed, if the key does not match
    /// the chain's first certificate, or if no client CA is usable.
    pub fn from_paths(paths: &TlsPaths) -> Result<Self, TlsError> {
        let chain = pem::certificates(&paths.cert)?;
        let key = pem::private_key(&paths.key)?;
        let roots = client_roots(&paths.client_ca)?;
        let build =
            |alpn: &[&[u8]]| server_config(paths, chain.clone(), key.clone_key(), &roots, alpn);
        Ok(Self {
            tcp: build(&TCP_ALPN)?,
            quic: build(&QUIC_ALPN)?,
        })
    }
}

/// The crypto provider of every TLS session here: ring, with its defaults.
///
/// Passed explicitly to each builder; the process-wide default is left alone.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The tenant named by a peer's verified certificate chain (leaf first).
///
/// `chain` is what the TLS session reports after the handshake; the leaf has
/// already been verified against a tenant CA. An empty or absent chain
/// cannot happen with the configurations built here (a certificate is
/// required), and is refused rather than trusted.
pub fn tenant_of_chain(
    chain: Option<&[CertificateDer<'_>]>,
    domain: &TrustDomain,
) -> Result<TenantId, IdentityError> {
    match chain.and_then(<[_]>::first) {
        Some(leaf) => tenant_from_certificate(leaf, domain),
        None => Err(IdentityError::BadCertificate(
            "the peer presented no client certificate".to_owned(),
        )),
    }
}

/// Every certificate of every CA file, as trust anchors for client certificates.
fn client_roots(files: &[PathBuf]) -> Result<Arc<RootCertStore>, TlsError> {
    if files.is_empty() {
        return Err(TlsError::NoClientCa);
    }
    let mut roots = RootCertStore::empty();
    for path in files {
        for (i, cert) in pem::certificates(path)?.into_iter().enumerate() {
            roots.add(cert).map_err(|e| TlsError::BadClientCa {
                path: path.clone(),
                index: i + 1,
                reason: e.to_string(),
            })?;
        }
    }
    Ok(Arc::new(roots))
}

fn server_config(
    paths: &TlsPaths,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &Arc<RootCertStore>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(&provider))
            .build()
            // Only "no roots" can fail here, and `client_roots` refuses an empty list.
            .map_err(|e| TlsError::BadClientCa {
                path: paths.client_ca.first().cloned().unwrap_or_default(),
                index: 0,
                reason: e.to_string(),
            })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| single_cert_error(&paths.cert, &paths.key, e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No 0-RTT: QUIC accepts only 0 or u32::MAX here, and early data is replayable.
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Names the file behind a `with_single_cert` failure.
fn single_cert_error(cert: &Path, key: &Path, e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            }
        }
        // The provider could not load the key (unsupported algorithm or encoding).
        rustls::Error::General(reason) => TlsError::UnusableKey {
            path: key.to_owned(),
            reason,
        },
        other => TlsError::BadServerCertificate {
            path: cert.to_owned(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;

    /// A development PKI written to a fresh directory, removed on drop.
    struct Files {
        dir: PathBuf,
        pki: certs::DevPki,
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn files(name: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("bulkhead-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let domain = TrustDomain::new("bulkhead.test").unwrap();
        let pki = certs::generate(&domain, &[TenantId::new("acme").unwrap()]).unwrap();
        pki.write_to(&dir, false).unwrap();
        Files { dir, pki }
    }

    impl Files {
        fn paths(&self) -> TlsPaths {
            TlsPaths {
                cert: self.dir.join(certs::SERVER_CERT_FILE),
                key: self.dir.join(certs::SERVER_KEY_FILE),
                client_ca: vec![self.dir.join(certs::TENANT_CA_FILE)],
            }
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.dir.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    #[test]
    fn builds_configs_with_their_alpn_and_no_early_data() {
        let f = files("ok");
        let tls = ServerTls::from_paths(&f.paths()).unwrap();
        assert_eq!(
            tls.tcp.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(tls.quic.alpn_protocols, vec![b"h3".to_vec()]);
        // TLS 1.3 only and a required client certificate are checked by
        // handshakes in tests/transport.rs: rustls does not expose them.
        for config in [&tls.tcp, &tls.quic] {
            assert_eq!(config.max_early_data_size, 0);
        }
    }

    #[test]
    fn each_bad_file_is_named_with_its_problem() {
        let f = files("bad");
        let missing = f.dir.join("nope.pem");
        let only_key = f.write("only-key.pem", &f.pki.server.key_pem);
        let only_cert = f.write("only-cert.key", &f.pki.server.cert_pem);
        let garbage_ca = f.write(
            "garbage-ca.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let other_key = f.write("other.key", &f.pki.untrusted_client.key_pem);
        let cases: Vec<(TlsPaths, &Path, &str)> = vec![
            (
                TlsPaths {
                    cert: missing.clone(),
                    ..f.paths()
                },
                &missing,
                "cannot read",
            ),
            (
                TlsPaths {
                    cert: only_key.clone(),
                    ..f.paths()
                },
                &only_key,
                "no PEM certificate",
            ),
            (
                TlsPaths {
                    key: only_cert.clone(),
                    ..f.paths()
                },
                &only_cert,
                "no PEM private key",
            ),
            (
                TlsPaths {
                    key: other_key.clone(),
                    ..f.paths()
                },
                &other_key,
                "does not match",
            ),
            (
                TlsPaths {
                    client_ca: vec![garbage_ca.clone()],
                    ..f.paths()
                },
                &garbage_ca,
                "trust anchor",
            ),
        ];
        for (paths, file, problem) in cases {
            let message = ServerTls::from_paths(&paths).unwrap_err().to_string();
            assert!(message.contains(&file.display().to_string()), "{message}");
            assert!(message.contains(problem), "{message}");
            assert!(!message.contains("PRIVATE KEY"), "{message}");
        }
        let no_ca = TlsPaths {
            client_ca: Vec::new(),
            ..f.paths()
        };
        assert!(matches!(
            ServerTls::from_paths(&no_ca),
            Err(TlsError::NoClientCa)
        ));
    }

    #[test]
    fn an_absent_chain_names_no_tenant() {
        let domain = TrustDomain::new("bulkhead.test").unwrap();
        assert!(matches!(
            tenant_of_chain(None, &domain),
            Err(IdentityError::BadCertificate(_))
        ));
        assert!(tenant_of_chain(Some(&[]), &domain).is_err());
    }
}
