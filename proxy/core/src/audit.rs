//! The audit log's format: events, per-tenant keys, sealed and chained
//! segment files, and their verification, as pure functions over bytes.
//!
//! The I/O (the ring between producers and the writer, files, fsync,
//! rotation, the CLI) lives in the `bulkhead` crate; everything that decides
//! what a byte means lives here, so `verify` and the writer cannot disagree.
//!
//! # Partitions and keys
//!
//! Every event belongs to one partition: its tenant's, or [`PartitionId::host`]
//! (`_host`, which no tenant id can spell) for host-level events with no
//! tenant. From a 32-byte [`MasterKey`], HKDF-SHA-256 derives each
//! partition's [`TenantKey`]: a sealing key (AES-256-GCM), a separate content
//! digest key (HMAC-SHA-256: prompts and completions are recorded only as
//! keyed digests, so a short prompt cannot be confirmed by hashing guesses)
//! and an 8-byte [`KeyId`] written in every segment header. A tenant key,
//! exported alone, opens only its own partition.
//!
//! # Segment file
//!
//! ```text
//! header (168 bytes):
//!   magic "BHAUDSG1" | version u16 | reserved u16 | segment u32 | key id [8]
//!   | created unix ns u64 | prev seq u64 | prev chain [32]
//!   | partition len u8 | partition [63, zero padded] | SHA-256 of the above [32]
//! then records, each:
//!   len u32 | seq u64 | check u32 | ciphertext + GCM tag [len] | chain [32]
//! ```
//!
//! All integers are big-endian. `check` is the first 4 bytes of SHA-256 over
//! `len ‖ seq`, so a damaged frame header is told from a torn one. The
//! ciphertext is the postcard encoding of an [`AuditEvent`], sealed with
//! AES-256-GCM under the partition's key; the nonce is `segment (u32) ‖ index
//! of the record in its segment (u64)`, unique because every writer start
//! opens a new segment with a higher number; the associated data binds the
//! partition, segment number, sequence number and key id. Each record's chain
//! hash is SHA-256(previous chain hash ‖ len ‖ seq ‖ check ‖ ciphertext).
//! A segment header repeats the chain hash and seq of the last record before
//! it, so the chain runs across segments from a genesis hash derived from the
//! partition name.

mod event;
mod format;
mod key;
mod scan;
mod time;

pub use self::{
    event::{
        AuditEvent, ConnectionRefused, ContentDigest, EventKind, GuardViolation, KernelDrops,
        PartitionId, PartitionIdError, Recovered, RequestEvent,
    },
    format::{
        CHAIN_LEN, ChainHash, FORMAT_VERSION, FRAME_HEADER_LEN, HEADER_LEN, HeaderError,
        MAX_PLAINTEXT_LEN, SEGMENT_MAGIC, SealError, SegmentHeader, SegmentSealer, TAG_LEN,
        genesis_chain,
    },
    key::{ContentHasher, KeyError, KeyId, MasterKey, TenantKey},
    scan::{
        BadRecord, Failure, OpenedRecord, PartitionReport, PartitionVerifier, SegmentScan,
        SegmentTail, open_partition, scan_segment, valid_prefix_len, verify_partition,
    },
    time::{TimeParseError, format_rfc3339, parse_time},
};

/// The file name of segment `segment`: 16 lowercase hex digits and `.seg`.
pub fn segment_file_name(segment: u32) -> String {
    format!("{segment:016x}.seg")
}

/// The segment number a file name spells, if it is one [`segment_file_name`] writes.
pub fn parse_segment_file_name(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16)
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_file_names_round_trip_and_reject_strangers() {
        assert_eq!(segment_file_name(0x2a), "000000000000002a.seg");
        assert_eq!(parse_segment_file_name("000000000000002a.seg"), Some(0x2a));
        assert_eq!(parse_segment_file_name("000000000000002A.seg"), None);
        assert_eq!(parse_segment_file_name("2a.seg"), None);
        assert_eq!(parse_segment_file_name("0000000100000000.seg"), None);
        assert_eq!(parse_segment_file_name("000000000000002a.seg.tmp"), None);
    }
}
