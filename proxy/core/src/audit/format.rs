//! Segment headers, record frames, the chain, and sealing (see the module docs
//! of [`crate::audit`] for the byte layout).

use super::event::{AuditEvent, PartitionId};
use super::key::{KeyId, TenantKey};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use sha2::{Digest, Sha256};
use std::fmt;

/// The first 8 bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"BHAUDSG1";
/// The segment format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes of a segment header.
pub const HEADER_LEN: usize = 168;
/// Bytes of a record's frame header: `len u32 | seq u64 | check u32`.
pub const FRAME_HEADER_LEN: usize = 16;
/// Bytes of a chain hash.
pub const CHAIN_LEN: usize = 32;
/// Bytes of a GCM tag.
pub const TAG_LEN: usize = 16;
/// The largest plaintext of one record.
pub const MAX_PLAINTEXT_LEN: usize = 64 * 1024;

const PARTITION_FIELD: usize = 63;
const HASHED_LEN: usize = HEADER_LEN - 32;
const AAD_LABEL: &[u8] = b"bulkhead-audit-v1";

/// A chain hash: SHA-256 over the previous one and a record's frame.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ChainHash(pub [u8; 32]);

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({self})")
    }
}

/// The chain hash before a partition's first record, derived from its name.
pub fn genesis_chain(partition: &PartitionId) -> ChainHash {
    let name = partition.as_str().as_bytes();
    ChainHash(
        Sha256::new()
            .chain_update(b"bulkhead-audit-genesis-v1")
            .chain_update([u8::try_from(name.len()).unwrap_or(u8::MAX)])
            .chain_update(name)
            .finalize()
            .into(),
    )
}

/// The chain hash after a record: SHA-256(prev ‖ frame header ‖ ciphertext).
pub(super) fn chain_next(prev: &ChainHash, frame_header: &[u8], ciphertext: &[u8]) -> ChainHash {
    ChainHash(
        Sha256::new()
            .chain_update(prev.0)
            .chain_update(frame_header)
            .chain_update(ciphertext)
            .finalize()
            .into(),
    )
}

/// The check field of a frame header: 4 bytes of SHA-256 over `len ‖ seq`.
pub(super) fn frame_check(len_and_seq: &[u8]) -> [u8; 4] {
    let hash = Sha256::new()
        .chain_update(b"frame")
        .chain_update(len_and_seq)
        .finalize();
    [hash[0], hash[1], hash[2], hash[3]]
}

/// The nonce of record `index` of `segment`: `segment u32 ‖ index u64`.
pub(super) fn nonce(segment: u32, index: u64) -> [u8; 12] {
    let mut n = [0; 12];
    n[..4].copy_from_slice(&segment.to_be_bytes());
    n[4..].copy_from_slice(&index.to_be_bytes());
    n
}

/// The associated data of a record, less the seq (its last 8 bytes).
pub(super) fn aad_prefix(partition: &PartitionId, segment: u32, key_id: KeyId) -> Vec<u8> {
    let name = partition.as_str().as_bytes();
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + 1 + name.len() + 4 + 8 + 8);
    aad.extend_from_slice(AAD_LABEL);
    aad.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    aad.extend_from_slice(name);
    aad.extend_from_slice(&segment.to_be_bytes());
    aad.extend_from_slice(&key_id.0);
    aad.extend_from_slice(&[0; 8]);
    aad
}

/// Writes `seq` into the last 8 bytes of an [`aad_prefix`].
pub(super) fn aad_set_seq(aad: &mut [u8], seq: u64) {
    let n = aad.len();
    aad[n - 8..].copy_from_slice(&seq.to_be_bytes());
}

pub(super) fn cipher(key: &TenantKey) -> Aes256Gcm {
    Aes256Gcm::new(key.seal_key().into())
}

/// A segment file's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's number (its file name); strictly increasing per partition.
    pub segment: u32,
    /// Id of the key its records are sealed under.
    pub key_id: KeyId,
    /// When the writer created it (Unix ns).
    pub created_unix_ns: u64,
    /// Seq of the partition's last record before this segment (0: none yet).
    pub prev_seq: u64,
    /// Chain hash after that record (the genesis hash if none).
    pub prev_chain: ChainHash,
    /// The partition it belongs to.
    pub partition: PartitionId,
}

/// Why bytes are not a segment header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("shorter than a segment header ({0} of {HEADER_LEN} bytes)")]
    Short(usize),
    /// Not a segment file.
    #[error("not an audit segment (bad magic)")]
    Magic,
    /// A format version this build does not read.
    #[error("segment format version {0}; this build reads {FORMAT_VERSION}")]
    Version(u16),
    /// The header's own hash does not match: it was altered or damaged.
    #[error("segment header altered or damaged (its hash does not match)")]
    Hash,
    /// The partition name field is not a partition.
    #[error("segment header names no valid partition")]
    Partition,
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0; HEADER_LEN];
        h[..8].copy_from_slice(&SEGMENT_MAGIC);
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        h[12..16].copy_from_slice(&self.segment.to_be_bytes());
        h[16..24].copy_from_slice(&self.key_id.0);
        h[24..32].copy_from_slice(&self.created_unix_ns.to_be_bytes());
        h[32..40].copy_from_slice(&self.prev_seq.to_be_bytes());
        h[40..72].copy_from_slice(&self.prev_chain.0);
        let name = self.partition.as_str().as_bytes();
        let len = name.len().min(PARTITION_FIELD);
        h[72] = u8::try_from(len).unwrap_or(0);
        h[73..73 + len].copy_from_slice(&name[..len]);
        let hash: [u8; 32] = Sha256::digest(&h[..HASHED_LEN]).into();
        h[HASHED_LEN..].copy_from_slice(&hash);
        h
    }

    /// Parses the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        if bytes.len() < HEADER_LEN {
            if !bytes.is_empty() && !SEGMENT_MAGIC.starts_with(&bytes[..bytes.len().min(8)]) {
                return Err(HeaderError::Magic);
            }
            return Err(HeaderError::Short(bytes.len()));
        }
        let h = &bytes[..HEADER_LEN];
        if h[..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic);
        }
        let version = u16::from_be_bytes([h[8], h[9]]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        let hash: [u8; 32] = Sha256::digest(&h[..HASHED_LEN]).into();
        if hash[..] != h[HASHED_LEN..] {
            return Err(HeaderError::Hash);
        }
        let len = usize::from(h[72]);
        if len > PARTITION_FIELD || h[10..12] != [0, 0] {
            return Err(HeaderError::Partition);
        }
        let partition = std::str::from_utf8(&h[73..73 + len])
            .ok()
            .and_then(|s| PartitionId::parse(s).ok())
            .ok_or(HeaderError::Partition)?;
        let u64_at = |at: usize| u64::from_be_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        let mut key_id = [0; 8];
        key_id.copy_from_slice(&h[16..24]);
        let mut prev_chain = [0; 32];
        prev_chain.copy_from_slice(&h[40..72]);
        Ok(Self {
            segment: u32::from_be_bytes(h[12..16].try_into().expect("4 bytes")),
            key_id: KeyId(key_id),
            created_unix_ns: u64_at(24),
            prev_seq: u64_at(32),
            prev_chain: ChainHash(prev_chain),
            partition,
        })
    }
}

/// Why an event could not be sealed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The event encodes to more than [`MAX_PLAINTEXT_LEN`] bytes.
    #[error("audit event of {0} bytes exceeds the {MAX_PLAINTEXT_LEN}-byte record limit")]
    TooLarge(usize),
    /// The event could not be encoded.
    #[error("audit event could not be encoded: {0}")]
    Encode(String),
    /// The key is another partition's.
    #[error("key of partition {key} cannot seal partition {segment}")]
    WrongPartition {
        /// The key's partition.
        key: PartitionId,
        /// The segment's partition.
        segment: PartitionId,
    },
}

/// Seals and chains records into one segment: the writer's sans-IO half.
///
/// Made from the segment's header, it continues the chain and the seq from
/// the header's `prev_*` fields; every record gets the next seq and the next
/// nonce of this segment.
pub struct SegmentSealer {
    cipher: Aes256Gcm,
    segment: u32,
    aad: Vec<u8>,
    index: u64,
    seq: u64,
    chain: ChainHash,
    scratch: Vec<u8>,
}

impl fmt::Debug for SegmentSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentSealer")
            .field("segment", &self.segment)
            .field("index", &self.index)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl SegmentSealer {
    /// A sealer for the segment `header` starts, under `key`.
    pub fn new(key: &TenantKey, header: &SegmentHeader) -> Result<Self, SealError> {
        if key.partition() != &header.partition {
            return Err(SealError::WrongPartition {
                key: key.partition().clone(),
                segment: header.partition.clone(),
            });
        }
        Ok(Self {
            cipher: cipher(key),
            segment: header.segment,
            aad: aad_prefix(&header.partition, header.segment, key.key_id()),
            index: 0,
            seq: header.prev_seq,
            chain: header.prev_chain,
            scratch: Vec::with_capacity(512),
        })
    }

    /// Encodes, seals and chains `event`, appending its frame to `out`;
    /// returns its seq. On error nothing is appended and nothing advances.
    pub fn seal(&mut self, event: &AuditEvent, out: &mut Vec<u8>) -> Result<u64, SealError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let scratch =
            postcard::to_extend(event, scratch).map_err(|e| SealError::Encode(e.to_string()))?;
        let sealed = self.seal_plaintext(&scratch, out);
        self.scratch = scratch;
        sealed
    }

    /// Seals `plaintext` (already an encoded event) as the next record.
    pub fn seal_plaintext(
        &mut self,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<u64, SealError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(SealError::TooLarge(plaintext.len()));
        }
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        out.extend_from_slice(plaintext);
        Ok(self.seal_in_place(out, start))
    }

    /// `out[start..]` is a blank frame header and the plaintext: seal it.
    fn seal_in_place(&mut self, out: &mut Vec<u8>, start: usize) -> u64 {
        let plain_len = out.len() - start - FRAME_HEADER_LEN;
        let seq = self.seq + 1;
        let ct_len = u32::try_from(plain_len + TAG_LEN).expect("plaintext length is bounded");
        let header = &mut out[start..start + FRAME_HEADER_LEN];
        header[..4].copy_from_slice(&ct_len.to_be_bytes());
        header[4..12].copy_from_slice(&seq.to_be_bytes());
        let check = frame_check(&header[..12]);
        header[12..].copy_from_slice(&check);
        aad_set_seq(&mut self.aad, seq);
        let nonce = nonce(self.segment, self.index);
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                &self.aad,
                &mut out[start + FRAME_HEADER_LEN..],
            )
            .expect("AES-GCM seals any plaintext under 64 GiB");
        out.extend_from_slice(&tag);
        let frame = &out[start..];
        self.chain = chain_next(
            &self.chain,
            &frame[..FRAME_HEADER_LEN],
            &frame[FRAME_HEADER_LEN..],
        );
        out.extend_from_slice(&self.chain.0);
        self.index += 1;
        self.seq = seq;
        seq
    }

    /// The seq of the last record sealed (or the header's `prev_seq`).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// The chain hash after the last record sealed.
    pub fn last_chain(&self) -> ChainHash {
        self.chain
    }

    /// Records sealed into this segment.
    pub fn records(&self) -> u64 {
        self.index
    }
}

/// Opens a sealed record in place: `buf` holds ciphertext ‖ tag; on success
/// it holds the plaintext.
pub(super) fn open_in_place(
    cipher: &Aes256Gcm,
    aad: &[u8],
    segment: u32,
    index: u64,
    buf: &mut Vec<u8>,
) -> bool {
    if buf.len() < TAG_LEN {
        return false;
    }
    let split = buf.len() - TAG_LEN;
    let tag = *Tag::from_slice(&buf[split..]);
    buf.truncate(split);
    let nonce = nonce(segment, index);
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(&nonce), aad, buf, &tag)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::MasterKey;

    fn header(partition: &str) -> SegmentHeader {
        let partition = PartitionId::parse(partition).unwrap();
        SegmentHeader {
            segment: 3,
            key_id: KeyId([1; 8]),
            created_unix_ns: 99,
            prev_seq: 0,
            prev_chain: genesis_chain(&partition),
            partition,
        }
    }

    #[test]
    fn headers_round_trip_and_detect_any_flipped_byte() {
        let h = header("acme");
        let bytes = h.encode();
        assert_eq!(SegmentHeader::decode(&bytes).unwrap(), h);
        for i in 0..HEADER_LEN {
            let mut b = bytes;
            b[i] ^= 0x10;
            assert!(SegmentHeader::decode(&b).is_err(), "byte {i}");
        }
        assert_eq!(
            SegmentHeader::decode(&bytes[..5]),
            Err(HeaderError::Short(5))
        );
    }

    #[test]
    fn sealing_refuses_another_partitions_key_and_never_repeats_a_nonce() {
        let master = MasterKey::from_bytes([3; 32]);
        let h = header("acme");
        let other = master.tenant_key(&PartitionId::parse("other").unwrap());
        assert!(SegmentSealer::new(&other, &h).is_err());
        let key = master.tenant_key(&h.partition);
        let mut sealer = SegmentSealer::new(&key, &h).unwrap();
        let mut out = Vec::new();
        let first = sealer.seal_plaintext(b"same", &mut out).unwrap();
        let len = out.len();
        let second = sealer.seal_plaintext(b"same", &mut out).unwrap();
        assert_eq!((first, second), (1, 2));
        // Same plaintext, different nonce and seq: different ciphertext.
        assert_ne!(
            out[FRAME_HEADER_LEN..len - CHAIN_LEN],
            out[len + FRAME_HEADER_LEN..out.len() - CHAIN_LEN]
        );
        assert_eq!(
            sealer.seal_plaintext(&vec![0; MAX_PLAINTEXT_LEN + 1], &mut out),
            Err(SealError::TooLarge(MAX_PLAINTEXT_LEN + 1))
        );
    }
}
