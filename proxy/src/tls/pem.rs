//! Reading the PEM files named by `[tls]`, with errors that name the file.
//!
//! Files are read once, then parsed from memory, so a parse error can say
//! which file it came from (the `pki_types` file readers only say "I/O").

use super::TlsError;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

/// Every `CERTIFICATE` block of a PEM file, in order (the leaf first for a chain).
pub(super) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_owned(),
            reason: pem_reason(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub(super) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        // The reason never quotes the file's bytes: this may be a secret.
        other => TlsError::BadPem {
            path: path.to_owned(),
            reason: pem_reason(&other),
        },
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A description of a PEM parse error that carries no file content.
fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_owned(),
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_owned(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".to_owned(),
        pem::Error::Io(e) => format!("I/O error: {e}"),
        pem::Error::NoItemsFound => "no PEM section of the expected kind".to_owned(),
        pem::Error::SectionTooLarge => "a PEM section is larger than 256 MB".to_owned(),
        _ => "malformed PEM".to_owned(),
    }
}
