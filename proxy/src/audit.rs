//! The audit stream's I/O: the bounded ring producers submit to, the writer
//! thread that seals, chains and group-commits per-tenant segment files, the
//! live tail socket, and the `bulkhead audit` commands.
//!
//! The format (events, keys, sealing, chaining, verification) is
//! [`bulkhead_core::audit`]; nothing here decides what a byte means.
//!
//! # Use from the request path
//!
//! ```no_run
//! use bulkhead::audit::{AuditKeys, AuditWriter, WriterConfig, new_request_id, unix_now_ns};
//! use bulkhead_core::audit::{AuditEvent, EventKind, RequestEvent};
//! use std::time::Duration;
//! # fn main() -> anyhow::Result<()> {
//! let master = bulkhead::audit::read_master_key("/etc/bulkhead/audit.key".as_ref())?;
//! let keys = AuditKeys::new(master.clone());
//! let writer = AuditWriter::start(master, WriterConfig::new("/var/lib/bulkhead/audit"), Vec::new())?;
//! let sink = writer.sink();
//! let tenant = bulkhead_core::TenantId::new("acme")?;
//! let event = AuditEvent {
//!     time_unix_ns: unix_now_ns(),
//!     kind: EventKind::Request(RequestEvent {
//!         request_id: new_request_id(),
//!         prompt_digest: keys.content_digest(&tenant, b"the prompt"),
//!         response_digest: keys.content_digest(&tenant, b"the completion"),
//!         tenant,
//!         model: "tiny".into(),
//!         input_tokens: 3, output_tokens: 2, ttft_us: Some(800), latency_us: 2_000,
//!         worker: Some(0), rerouted: false, cache_hit: false, status: 200,
//!         error_code: None, source: None, api_key_prefix: None,
//!     }),
//! };
//! // Before the request is reported complete; an error means refuse it.
//! let ticket = sink.submit(event, Duration::from_millis(5))?;
//! # let _ = ticket;
//! # Ok(()) }
//! ```

pub mod cli;
mod ring;
mod tail;
mod writer;

pub use self::{
    ring::{AuditCounters, AuditSink, DurableError, NotTaken, SubmitError, Ticket},
    tail::{TailObserver, TailServer},
    writer::{AuditWriter, CommitObserver, Committed, WriterConfig},
};

use bulkhead_core::TenantId;
use bulkhead_core::audit::{
    ContentDigest, ContentHasher, KeyError, KeyId, MasterKey, PartitionId, TenantKey,
};
use bulkhead_core::wire::RequestId;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// What stopped the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The log was written under another master key.
    #[error(
        "partition {partition} is sealed under key id {found}; the master key given derives key id {expected} (wrong master key?)"
    )]
    KeyMismatch {
        /// The partition.
        partition: PartitionId,
        /// The key id in its newest segment.
        found: KeyId,
        /// The key id the given master key derives.
        expected: KeyId,
    },
    /// A partition used every segment number.
    #[error("partition {0} has used every segment number")]
    SegmentNumbersExhausted(PartitionId),
    /// A segment could not be set up for sealing.
    #[error("sealing: {0}")]
    Seal(String),
    /// A key file is unreadable or malformed.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong (never its content).
        #[source]
        source: KeyError,
    },
    /// The writer thread panicked.
    #[error("the audit writer thread panicked")]
    WriterPanicked,
}

impl AuditError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Now, as nanoseconds since the Unix epoch (the time stamped on events).
pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Fills `buf` from the OS's CSPRNG.
///
/// # Panics
///
/// If the OS has no random source (not a state a data plane can run in).
pub fn os_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source is unavailable");
}

/// A fresh random 128-bit request id: 16 bytes of the OS's CSPRNG, drawn
/// [`ID_POOL_BYTES`] at a time per thread (one system call per 256 ids
/// instead of one per request; each byte is handed out once).
pub fn new_request_id() -> RequestId {
    thread_local! {
        static POOL: std::cell::RefCell<(usize, [u8; ID_POOL_BYTES])> =
            const { std::cell::RefCell::new((ID_POOL_BYTES, [0; ID_POOL_BYTES])) };
    }
    POOL.with_borrow_mut(|(used, pool)| {
        if *used + 16 > ID_POOL_BYTES {
            os_random(pool);
            *used = 0;
        }
        let mut id = [0; 16];
        id.copy_from_slice(&pool[*used..*used + 16]);
        *used += 16;
        RequestId(u128::from_be_bytes(id))
    })
}

/// Bytes of randomness a thread draws at once for request ids.
const ID_POOL_BYTES: usize = 4096;

/// A new random master key.
pub fn generate_master_key() -> MasterKey {
    let mut b = [0; 32];
    os_random(&mut b);
    MasterKey::from_bytes(b)
}

/// The contents of a key file: a master key or a tenant-scoped key.
#[derive(Clone, Debug)]
pub enum KeyFile {
    /// Opens every partition.
    Master(MasterKey),
    /// Opens one partition only.
    Tenant(TenantKey),
}

impl KeyFile {
    /// The key for `partition`, or `None` when this key cannot open it.
    pub fn for_partition(&self, partition: &PartitionId) -> Option<TenantKey> {
        match self {
            Self::Master(m) => Some(m.tenant_key(partition)),
            Self::Tenant(t) => (t.partition() == partition).then(|| t.clone()),
        }
    }
}

/// Reads a key file (master or tenant-scoped); errors name the file and the
/// problem, never the content.
pub fn read_key_file(path: &Path) -> Result<KeyFile, AuditError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuditError::io(format!("reading the key file {}", path.display()), e))?;
    let parsed = if text.trim_start().starts_with("bulkhead-audit-tenant-key") {
        TenantKey::import(&text).map(KeyFile::Tenant)
    } else {
        MasterKey::from_hex(&text)
            .map(KeyFile::Master)
            .map_err(|e| {
                if text.trim().bytes().all(|b| b.is_ascii_hexdigit()) {
                    e
                } else {
                    KeyError::Unrecognised
                }
            })
    };
    parsed.map_err(|source| AuditError::KeyFile {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a master key file; a tenant-scoped key is refused.
pub fn read_master_key(path: &Path) -> Result<MasterKey, AuditError> {
    match read_key_file(path)? {
        KeyFile::Master(m) => Ok(m),
        KeyFile::Tenant(_) => Err(AuditError::KeyFile {
            path: path.display().to_string(),
            source: KeyError::TenantFormat(
                "this is a tenant-scoped key; writing the log needs the master key",
            ),
        }),
    }
}

/// Per-tenant digest keys for the request path, derived once and cached.
pub struct AuditKeys {
    master: MasterKey,
    cache: Mutex<HashMap<TenantId, TenantKey>>,
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKeys(..)")
    }
}

impl AuditKeys {
    /// Keys derived from `master` (the writer's).
    pub fn new(master: MasterKey) -> Self {
        Self {
            master,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, tenant: &TenantId) -> TenantKey {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .entry(tenant.clone())
            .or_insert_with(|| self.master.tenant_key(&PartitionId::tenant(tenant)))
            .clone()
    }

    /// HMAC-SHA-256 of `content` under `tenant`'s digest key.
    pub fn content_digest(&self, tenant: &TenantId, content: &[u8]) -> ContentDigest {
        self.key(tenant).content_digest(content)
    }

    /// An incremental digest for content that arrives in pieces.
    pub fn content_hasher(&self, tenant: &TenantId) -> ContentHasher {
        self.key(tenant).content_hasher()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_distinct_across_pool_refills_and_threads() {
        let per_thread = 3 * ID_POOL_BYTES / 16 + 7;
        let ids: Vec<u128> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..per_thread)
                            .map(|_| new_request_id().0)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), 4 * per_thread);
        // Random bits, not a counter: every bit position takes both values.
        let (ones, zeros) = ids
            .iter()
            .fold((0u128, 0u128), |(o, z), id| (o | id, z | !id));
        assert_eq!((ones, zeros), (u128::MAX, u128::MAX));
    }
}
