//! Reading segments back: frame parsing with positions, torn-tail detection,
//! and verification of a partition's chain and seals.

use super::event::{AuditEvent, PartitionId};
use super::format::{
    CHAIN_LEN, ChainHash, FRAME_HEADER_LEN, HEADER_LEN, HeaderError, MAX_PLAINTEXT_LEN,
    SegmentHeader, TAG_LEN, aad_prefix, aad_set_seq, chain_next, cipher, frame_check,
    genesis_chain, open_in_place,
};
use super::key::{KeyId, TenantKey};
use aes_gcm::Aes256Gcm;
use std::fmt;

/// What is wrong with a record (or a segment header).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The segment header is unreadable or altered.
    #[error("{0}")]
    Header(HeaderError),
    /// The header names another partition: a segment moved between tenants.
    #[error("segment belongs to partition `{found}` (moved between partitions?)")]
    WrongPartition {
        /// The partition the header names.
        found: String,
    },
    /// The header's segment number is not its file's.
    #[error("header says segment {found:016x}, the file name another (renamed?)")]
    WrongSegmentNumber {
        /// The number in the header.
        found: u32,
    },
    /// Segment numbers out of order.
    #[error("segment numbers are not increasing")]
    SegmentOrder,
    /// The header does not continue the previous segment's seq.
    #[error(
        "segment continues from seq {found}, the previous segment ended at seq {expected} (segment or records missing)"
    )]
    Discontinuity {
        /// The previous segment's last seq.
        expected: u64,
        /// The header's `prev_seq`.
        found: u64,
    },
    /// The header does not continue the previous segment's chain hash.
    #[error("segment does not continue the chain of the one before it")]
    ChainBreak,
    /// The segment is sealed under another key than the one given.
    #[error(
        "sealed under key id {found}, the key given has id {expected} (wrong key, or another partition's)"
    )]
    KeyIdMismatch {
        /// The given key's id.
        expected: KeyId,
        /// The header's key id.
        found: KeyId,
    },
    /// Segments of one partition under different keys.
    #[error("key id {found} differs from the partition's earlier segments ({expected})")]
    KeyIdChanged {
        /// The earlier segments' key id.
        expected: KeyId,
        /// This header's.
        found: KeyId,
    },
    /// A frame header whose check field does not match.
    #[error("record frame header altered or damaged")]
    CorruptFrame,
    /// A frame claiming an impossible length.
    #[error("record frame claims {len} bytes, more than any record")]
    OversizeFrame {
        /// The claimed length.
        len: u32,
    },
    /// A record out of sequence: one deleted, reordered or duplicated.
    #[error("expected seq {expected}, found seq {found} (record deleted, reordered or duplicated)")]
    SeqGap {
        /// The seq that should come next.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// The stored chain hash is not the chain of the record's bytes.
    #[error("chain hash mismatch (record altered)")]
    ChainMismatch,
    /// The seal does not open under the key: altered, or another key.
    #[error("seal does not verify (record altered, or sealed under another key)")]
    SealFailed,
    /// The seal opens but the plaintext is no event this build knows.
    #[error("record decrypts but does not decode as an audit event")]
    Undecodable,
    /// A segment other than the last ends inside a record.
    #[error("segment ends {bytes} bytes into a record (truncated)")]
    Truncated {
        /// Bytes of the partial record.
        bytes: u64,
    },
    /// The partition's last segment ends inside a record: a crash the
    /// writer has not yet recovered from (or a truncation).
    #[error(
        "torn tail: {bytes} bytes of an incomplete last record (writer crashed and has not restarted?)"
    )]
    TornTail {
        /// Bytes of the partial record.
        bytes: u64,
    },
}

/// The first bad record of a partition, and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRecord {
    /// The partition.
    pub partition: PartitionId,
    /// The segment number.
    pub segment: u32,
    /// Byte offset of the record (or header) in the segment file.
    pub offset: u64,
    /// The record's seq, when its frame could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub failure: Failure,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tenant {}: segment {:016x} at byte {}",
            self.partition, self.segment, self.offset
        )?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.failure)
    }
}

impl std::error::Error for BadRecord {}

/// How a segment's bytes end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentTail {
    /// After the last valid record: nothing.
    Clean,
    /// After the last valid record: part of a record (or zeros), as a crash leaves.
    Torn {
        /// Where the valid prefix ends.
        offset: u64,
        /// Bytes after it.
        bytes: u64,
    },
    /// A bad record (or header) that is not a torn tail: damage or tampering.
    Bad {
        /// Where it starts.
        offset: u64,
        /// Its seq, when its frame could be read.
        seq: Option<u64>,
        /// What is wrong.
        failure: Failure,
    },
}

/// What scanning one segment found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentScan {
    /// The header, when it could be read.
    pub header: Option<SegmentHeader>,
    /// Valid records.
    pub records: u64,
    /// Seq of the last valid record (the header's `prev_seq` if none).
    pub end_seq: u64,
    /// Chain hash after the last valid record.
    pub end_chain: ChainHash,
    /// Bytes of header and valid records: where a torn tail is cut.
    pub valid_len: usize,
    /// What follows them.
    pub tail: SegmentTail,
}

/// A record opened under its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedRecord {
    /// Its seq in the partition.
    pub seq: u64,
    /// The segment it is in.
    pub segment: u32,
    /// The event.
    pub event: AuditEvent,
}

/// Scans one segment: the header (naming `partition` and `segment`), then
/// each record's frame, seq and chain hash, stopping at the first that is
/// bad or torn. Seals are not checked (no key).
pub fn scan_segment(partition: &PartitionId, segment: u32, bytes: &[u8]) -> SegmentScan {
    scan(partition, segment, bytes, None, None, &mut |_| {})
}

/// Bytes of `bytes` that are a valid header and valid records: where a
/// crash's torn tail starts (all of it when the segment is whole).
pub fn valid_prefix_len(partition: &PartitionId, segment: u32, bytes: &[u8]) -> usize {
    scan_segment(partition, segment, bytes).valid_len
}

/// The chain state a segment must continue.
#[derive(Clone, Copy)]
struct Continuity {
    seq: u64,
    chain: ChainHash,
    key_id: KeyId,
}

struct Opener<'k> {
    key: &'k TenantKey,
    cipher: Aes256Gcm,
}

impl Opener<'_> {
    /// Opens record `index` of `segment` (seq `seq`) and decodes its event.
    fn open(
        &self,
        aad: &mut [u8],
        plain: &mut Vec<u8>,
        segment: u32,
        index: u64,
        seq: u64,
        ciphertext: &[u8],
    ) -> Result<AuditEvent, Failure> {
        plain.clear();
        plain.extend_from_slice(ciphertext);
        aad_set_seq(aad, seq);
        if !open_in_place(&self.cipher, aad, segment, index, plain) {
            return Err(Failure::SealFailed);
        }
        postcard::from_bytes(plain).map_err(|_| Failure::Undecodable)
    }
}

/// What is wrong with a readable header, given where it was found and what
/// it must continue.
fn check_header(
    header: &SegmentHeader,
    partition: &PartitionId,
    segment: u32,
    opener: Option<&Opener<'_>>,
    prev: Option<Continuity>,
) -> Option<Failure> {
    if header.partition != *partition {
        Some(Failure::WrongPartition {
            found: header.partition.to_string(),
        })
    } else if header.segment != segment {
        Some(Failure::WrongSegmentNumber {
            found: header.segment,
        })
    } else if let Some(o) = opener.filter(|o| o.key.key_id() != header.key_id) {
        Some(Failure::KeyIdMismatch {
            expected: o.key.key_id(),
            found: header.key_id,
        })
    } else if let Some(p) = prev {
        if header.prev_seq != p.seq {
            Some(Failure::Discontinuity {
                expected: p.seq,
                found: header.prev_seq,
            })
        } else if header.prev_chain != p.chain {
            Some(Failure::ChainBreak)
        } else if header.key_id != p.key_id {
            Some(Failure::KeyIdChanged {
                expected: p.key_id,
                found: header.key_id,
            })
        } else {
            None
        }
    } else if header.prev_seq == 0 && header.prev_chain != genesis_chain(partition) {
        Some(Failure::ChainBreak)
    } else {
        None
    }
}

fn scan(
    partition: &PartitionId,
    segment: u32,
    bytes: &[u8],
    opener: Option<&Opener<'_>>,
    prev: Option<Continuity>,
    visit: &mut dyn FnMut(OpenedRecord),
) -> SegmentScan {
    let bad_header = |failure| SegmentScan {
        header: None,
        records: 0,
        end_seq: 0,
        end_chain: genesis_chain(partition),
        valid_len: 0,
        tail: SegmentTail::Bad {
            offset: 0,
            seq: None,
            failure,
        },
    };
    let header = match SegmentHeader::decode(bytes) {
        Ok(h) => h,
        Err(e) => return bad_header(Failure::Header(e)),
    };
    let header_failure = check_header(&header, partition, segment, opener, prev);
    if let Some(failure) = header_failure {
        let mut scan = bad_header(failure);
        scan.header = Some(header);
        return scan;
    }
    let mut aad = aad_prefix(partition, segment, header.key_id);
    let mut plain = Vec::new();
    let mut pos = HEADER_LEN;
    let mut seq = header.prev_seq;
    let mut chain = header.prev_chain;
    let mut records = 0u64;
    let tail = loop {
        let rest = &bytes[pos..];
        if rest.is_empty() {
            break SegmentTail::Clean;
        }
        let torn = SegmentTail::Torn {
            offset: pos as u64,
            bytes: rest.len() as u64,
        };
        let bad = |seq, failure| SegmentTail::Bad {
            offset: pos as u64,
            seq,
            failure,
        };
        if rest.len() < FRAME_HEADER_LEN {
            break torn;
        }
        let frame_header = &rest[..FRAME_HEADER_LEN];
        if frame_check(&frame_header[..12]) != frame_header[12..] {
            if rest.iter().all(|&b| b == 0) {
                break torn;
            }
            break bad(None, Failure::CorruptFrame);
        }
        let len = u32::from_be_bytes(frame_header[..4].try_into().expect("4 bytes"));
        let found = u64::from_be_bytes(frame_header[4..12].try_into().expect("8 bytes"));
        let ct_len = len as usize;
        if !(TAG_LEN..=MAX_PLAINTEXT_LEN + TAG_LEN).contains(&ct_len) {
            break bad(Some(found), Failure::OversizeFrame { len });
        }
        let frame_len = FRAME_HEADER_LEN + ct_len + CHAIN_LEN;
        if rest.len() < frame_len {
            break torn;
        }
        if found != seq + 1 {
            break bad(
                Some(found),
                Failure::SeqGap {
                    expected: seq + 1,
                    found,
                },
            );
        }
        let ciphertext = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + ct_len];
        let next = chain_next(&chain, frame_header, ciphertext);
        if next.0[..] != rest[FRAME_HEADER_LEN + ct_len..frame_len] {
            break bad(Some(found), Failure::ChainMismatch);
        }
        if let Some(o) = opener {
            match o.open(&mut aad, &mut plain, segment, records, found, ciphertext) {
                Ok(event) => visit(OpenedRecord {
                    seq: found,
                    segment,
                    event,
                }),
                Err(failure) => break bad(Some(found), failure),
            }
        }
        seq = found;
        chain = next;
        records += 1;
        pos += frame_len;
    };
    SegmentScan {
        header: Some(header),
        records,
        end_seq: seq,
        end_chain: chain,
        valid_len: pos,
        tail,
    }
}

/// What verifying a partition found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionReport {
    /// The partition.
    pub partition: PartitionId,
    /// Segments examined.
    pub segments: usize,
    /// Valid records before the first bad one (all of them if none).
    pub records: u64,
    /// Seq the earliest segment continues from (0 unless retention removed older ones).
    pub base_seq: Option<u64>,
    /// Seq of the last valid record.
    pub last_seq: u64,
    /// Chain hash after it.
    pub last_chain: ChainHash,
    /// Whether seals were checked (a key was given).
    pub sealed_checked: bool,
    /// The first bad record, if any.
    pub first_bad: Option<BadRecord>,
}

/// Verifies a partition one segment at a time, in increasing segment order,
/// so a caller can read one file at a time.
pub struct PartitionVerifier<'k> {
    opener: Option<Opener<'k>>,
    prev: Option<(u32, Continuity)>,
    report: PartitionReport,
}

impl fmt::Debug for PartitionVerifier<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionVerifier")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl<'k> PartitionVerifier<'k> {
    /// Starts verifying `partition`; with `key`, seals are checked and
    /// records opened too.
    pub fn new(partition: PartitionId, key: Option<&'k TenantKey>) -> Self {
        Self {
            opener: key.map(|key| Opener {
                key,
                cipher: cipher(key),
            }),
            prev: None,
            report: PartitionReport {
                last_chain: genesis_chain(&partition),
                partition,
                segments: 0,
                records: 0,
                base_seq: None,
                last_seq: 0,
                sealed_checked: key.is_some(),
                first_bad: None,
            },
        }
    }

    /// Checks the next segment (`last`: the partition's newest, where a torn
    /// tail is a crash's, not a truncation). `visit` sees each record that
    /// passed every check, when a key was given.
    pub fn segment(
        &mut self,
        number: u32,
        bytes: &[u8],
        last: bool,
        visit: &mut dyn FnMut(OpenedRecord),
    ) -> Result<(), BadRecord> {
        if let Some(bad) = &self.report.first_bad {
            return Err(bad.clone());
        }
        self.report.segments += 1;
        let partition = self.report.partition.clone();
        let bad = |offset, seq, failure| BadRecord {
            partition: partition.clone(),
            segment: number,
            offset,
            seq,
            failure,
        };
        let found = if self.prev.is_some_and(|(n, _)| number <= n) {
            Some(bad(0, None, Failure::SegmentOrder))
        } else {
            let prev = self.prev.map(|(_, c)| c);
            let scan = scan(&partition, number, bytes, self.opener.as_ref(), prev, visit);
            let r = &mut self.report;
            if let (None, Some(h)) = (&self.prev, &scan.header) {
                r.base_seq = Some(h.prev_seq);
            }
            r.records += scan.records;
            if scan.header.is_some() {
                r.last_seq = scan.end_seq;
                r.last_chain = scan.end_chain;
            }
            if let Some(h) = &scan.header {
                self.prev = Some((
                    number,
                    Continuity {
                        seq: scan.end_seq,
                        chain: scan.end_chain,
                        key_id: h.key_id,
                    },
                ));
            }
            match scan.tail {
                SegmentTail::Clean => None,
                SegmentTail::Torn { offset, bytes } => Some(bad(
                    offset,
                    None,
                    if last {
                        Failure::TornTail { bytes }
                    } else {
                        Failure::Truncated { bytes }
                    },
                )),
                SegmentTail::Bad {
                    offset,
                    seq,
                    failure,
                } => Some(bad(offset, seq, failure)),
            }
        };
        match found {
            Some(bad) => {
                self.report.first_bad = Some(bad.clone());
                Err(bad)
            }
            None => Ok(()),
        }
    }

    /// The report so far.
    pub fn finish(self) -> PartitionReport {
        self.report
    }
}

/// Verifies every chain link, frame and header of a partition's segments
/// (in increasing number, all of them from the oldest kept to the newest),
/// and with `key` every seal; reports the first bad record.
pub fn verify_partition(
    partition: &PartitionId,
    segments: &[(u32, &[u8])],
    key: Option<&TenantKey>,
) -> PartitionReport {
    let mut v = PartitionVerifier::new(partition.clone(), key);
    for (i, (number, bytes)) in segments.iter().enumerate() {
        if v.segment(*number, bytes, i + 1 == segments.len(), &mut |_| {})
            .is_err()
        {
            break;
        }
    }
    v.finish()
}

/// Opens every record of a partition under `key`, keeping those `keep`
/// accepts, only if the whole partition verifies: on any failure, the first
/// bad record and no plaintext at all.
pub fn open_partition(
    partition: &PartitionId,
    segments: &[(u32, &[u8])],
    key: &TenantKey,
    keep: &mut dyn FnMut(&OpenedRecord) -> bool,
) -> Result<Vec<OpenedRecord>, BadRecord> {
    let mut v = PartitionVerifier::new(partition.clone(), Some(key));
    let mut out = Vec::new();
    for (i, (number, bytes)) in segments.iter().enumerate() {
        v.segment(*number, bytes, i + 1 == segments.len(), &mut |r| {
            if keep(&r) {
                out.push(r);
            }
        })?;
    }
    Ok(out)
}
