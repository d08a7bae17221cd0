//! Keys: the master key, and each partition's keys derived from it.
//!
//! Key material never appears in `Debug` output or in errors.

use super::event::{ContentDigest, PartitionId};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fmt;

/// HKDF salt: fixes the derivation to this format version.
const HKDF_SALT: &[u8] = b"bulkhead-audit-v1";
/// First line of an exported tenant key file.
const TENANT_KEY_MAGIC: &str = "bulkhead-audit-tenant-key-v1";

/// Why key material was refused (never quoting the material).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A master key file that is not 64 hex digits.
    #[error("a master key is 64 hex digits (32 bytes); this is {0} characters")]
    MasterFormat(usize),
    /// A master key file with a character outside hex.
    #[error("a master key is hex digits only")]
    MasterNotHex,
    /// A file that is neither a master key nor a tenant key.
    #[error(
        "not an audit key: expected 64 hex digits (a master key) or a `{TENANT_KEY_MAGIC}` file"
    )]
    Unrecognised,
    /// A tenant key file with a missing or malformed line.
    #[error("tenant key file: {0}")]
    TenantFormat(&'static str),
    /// A tenant key file naming a bad partition.
    #[error("tenant key file: {0}")]
    TenantPartition(#[from] super::event::PartitionIdError),
    /// A tenant key whose stated key id does not match its key.
    #[error("tenant key file: its key id does not match its key (damaged file?)")]
    KeyIdMismatch,
}

/// A master key: 32 random bytes from which every partition's keys derive.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A master key of these bytes (from a CSPRNG).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses a master key file: 64 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(KeyError::MasterFormat(text.chars().count()));
        }
        let mut out = [0; 32];
        hex::decode_to_slice(text, &mut out).map_err(|_| KeyError::MasterNotHex)?;
        Ok(Self(out))
    }

    /// The key as 64 hex digits and a newline, for its file.
    pub fn to_hex(&self) -> String {
        let mut s = hex::encode(self.0);
        s.push('\n');
        s
    }

    /// The keys of `partition`.
    pub fn tenant_key(&self, partition: &PartitionId) -> TenantKey {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(HKDF_SALT), &self.0);
        let mut seal = [0; 32];
        let mut digest = [0; 32];
        let name = partition.as_str().as_bytes();
        hk.expand_multi_info(&[b"seal:", name], &mut seal)
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        hk.expand_multi_info(&[b"digest:", name], &mut digest)
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        TenantKey::new(partition.clone(), seal, digest)
    }
}

/// An 8-byte public name of a sealing key, written in every segment header:
/// the first 8 bytes of SHA-256 over a label and the key.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// One partition's keys: sealing (AES-256-GCM) and content digests (HMAC-SHA-256).
#[derive(Clone)]
pub struct TenantKey {
    partition: PartitionId,
    seal: [u8; 32],
    digest: [u8; 32],
    id: KeyId,
}

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantKey")
            .field("partition", &self.partition)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl TenantKey {
    fn new(partition: PartitionId, seal: [u8; 32], digest: [u8; 32]) -> Self {
        let id = Self::id_of(&seal);
        Self {
            partition,
            seal,
            digest,
            id,
        }
    }

    fn id_of(seal: &[u8; 32]) -> KeyId {
        let hash = Sha256::new()
            .chain_update(b"bulkhead-audit-key-id-v1")
            .chain_update(seal)
            .finalize();
        let mut id = [0; 8];
        id.copy_from_slice(&hash[..8]);
        KeyId(id)
    }

    /// The partition these keys open.
    pub fn partition(&self) -> &PartitionId {
        &self.partition
    }

    /// The sealing key's id.
    pub fn key_id(&self) -> KeyId {
        self.id
    }

    pub(super) fn seal_key(&self) -> &[u8; 32] {
        &self.seal
    }

    /// HMAC-SHA-256 of `content` under the digest key.
    pub fn content_digest(&self, content: &[u8]) -> ContentDigest {
        let mut h = self.content_hasher();
        h.update(content);
        h.finish()
    }

    /// An incremental digest, for content that arrives in pieces (a stream of tokens).
    pub fn content_hasher(&self) -> ContentHasher {
        ContentHasher(
            <Hmac<Sha256> as Mac>::new_from_slice(&self.digest)
                .expect("HMAC takes a key of any length"),
        )
    }

    /// The key as a tenant-scoped key file: it opens this partition only.
    pub fn export(&self) -> String {
        format!(
            "{TENANT_KEY_MAGIC}\npartition={}\nkey_id={}\nseal={}\ndigest={}\n",
            self.partition,
            self.id,
            hex::encode(self.seal),
            hex::encode(self.digest)
        )
    }

    /// Parses a file [`TenantKey::export`] wrote.
    pub fn import(text: &str) -> Result<Self, KeyError> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(TENANT_KEY_MAGIC) {
            return Err(KeyError::Unrecognised);
        }
        let (mut partition, mut key_id, mut seal, mut digest) = (None, None, None, None);
        for line in lines {
            let (k, v) = line
                .split_once('=')
                .ok_or(KeyError::TenantFormat("a line without `=`"))?;
            let slot = match k {
                "partition" => &mut partition,
                "key_id" => &mut key_id,
                "seal" => &mut seal,
                "digest" => &mut digest,
                _ => return Err(KeyError::TenantFormat("an unknown field")),
            };
            if slot.replace(v).is_some() {
                return Err(KeyError::TenantFormat("a field given twice"));
            }
        }
        let partition =
            PartitionId::parse(partition.ok_or(KeyError::TenantFormat("no `partition=` line"))?)?;
        let bytes32 = |v: Option<&str>, what| {
            let mut out = [0; 32];
            hex::decode_to_slice(v.ok_or(KeyError::TenantFormat(what))?, &mut out)
                .map_err(|_| KeyError::TenantFormat(what))?;
            Ok::<_, KeyError>(out)
        };
        let seal = bytes32(seal, "`seal=` must be 64 hex digits")?;
        let digest = bytes32(digest, "`digest=` must be 64 hex digits")?;
        let key = Self::new(partition, seal, digest);
        if key_id != Some(key.id.to_string().as_str()) {
            return Err(KeyError::KeyIdMismatch);
        }
        Ok(key)
    }
}

/// An HMAC-SHA-256 content digest in progress ([`TenantKey::content_hasher`]).
#[derive(Clone)]
pub struct ContentHasher(Hmac<Sha256>);

impl fmt::Debug for ContentHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentHasher(..)")
    }
}

impl ContentHasher {
    /// Feeds the next piece of content.
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    /// The digest of everything fed.
    pub fn finish(self) -> ContentDigest {
        ContentDigest(self.0.finalize().into_bytes().into())
    }
}

impl PartialEq for MasterKey {
    fn eq(&self, other: &Self) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}

impl PartialEq for TenantKey {
    fn eq(&self, other: &Self) -> bool {
        self.partition == other.partition
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                &self.seal[..],
                &other.seal[..],
            ))
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                &self.digest[..],
                &other.digest[..],
            ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        MasterKey::from_bytes([42; 32])
    }

    #[test]
    fn partitions_get_distinct_keys_and_ids() {
        let a = master().tenant_key(&PartitionId::parse("a").unwrap());
        let b = master().tenant_key(&PartitionId::parse("b").unwrap());
        assert_ne!(a.seal, b.seal);
        assert_ne!(a.seal, a.digest);
        assert_ne!(a.key_id(), b.key_id());
        let again = master().tenant_key(&PartitionId::parse("a").unwrap());
        assert_eq!(a.key_id(), again.key_id());
        assert_ne!(a.content_digest(b"hi"), b.content_digest(b"hi"));
        let mut h = a.content_hasher();
        h.update(b"h");
        h.update(b"i");
        assert_eq!(h.finish(), a.content_digest(b"hi"));
    }

    #[test]
    fn tenant_keys_export_and_import_and_nothing_leaks_in_debug() {
        let a = master().tenant_key(&PartitionId::parse("acme").unwrap());
        let text = a.export();
        let back = TenantKey::import(&text).unwrap();
        assert_eq!(back.key_id(), a.key_id());
        assert_eq!(back.partition().as_str(), "acme");
        let flipped = text.replace(
            &format!("seal={}", hex::encode(a.seal)),
            &format!("seal={}", hex::encode([0u8; 32])),
        );
        assert_eq!(TenantKey::import(&flipped), Err(KeyError::KeyIdMismatch));
        assert!(!format!("{a:?}").contains(&hex::encode(a.seal)));
        assert_eq!(format!("{:?}", master()), "MasterKey(..)");
        let m = master();
        assert_eq!(MasterKey::from_hex(&m.to_hex()).unwrap().0, m.0);
        assert_eq!(MasterKey::from_hex("abc"), Err(KeyError::MasterFormat(3)));
    }
}
