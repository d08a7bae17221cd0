//! The audit log of a running `serve`: the writer (from `[audit]`), the
//! hook the API and the listeners record into, and the kernel's drop counts
//! aggregated into records.

use crate::{
    api::record::AuditHook,
    audit::{
        AuditKeys, AuditWriter, CommitObserver, TailServer, WriterConfig, generate_master_key,
        read_master_key, unix_now_ns,
    },
    ebpf::{KernelFlows, KernelPlane},
};
use anyhow::Context as _;
use bulkhead_core::{
    audit::{AuditEvent, EventKind, KernelDrops},
    config::AuditSettings,
};
use bulkhead_ebpf_common::UNKNOWN_TENANT;
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

/// How often the kernel's drop counters become records.
pub const DROP_WINDOW: Duration = Duration::from_secs(10);

/// The running audit log.
#[derive(Debug)]
pub struct AuditLog {
    /// The writer thread.
    pub writer: AuditWriter,
    /// What the API and the listeners record into.
    pub hook: AuditHook,
    /// The live tail, when `tail_socket` is set.
    pub tail: Option<TailServer>,
}

/// How long [`AuditLog::close`] waits for the records of requests the
/// listeners cut off to reach the ring (one may wait 2 s for room).
pub const RECORDS_SETTLE_WAIT: Duration = Duration::from_secs(5);

impl AuditLog {
    /// Closes the log once the listeners have stopped: waits (up to
    /// [`RECORDS_SETTLE_WAIT`]) for records still on their way (a stream's
    /// task submits its record once it sees its client gone, an aborted
    /// request as the runtime drops it), then writes what the ring holds
    /// and stops the writer.
    pub async fn close(self) -> anyhow::Result<()> {
        if !self.hook.records_settled(RECORDS_SETTLE_WAIT).await {
            tracing::error!(
                pending = self.hook.pending_records(),
                "audit records still pending at shutdown are lost"
            );
        }
        let Self { writer, tail, .. } = self;
        drop(tail);
        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .context("the audit writer's shutdown panicked")?
            .context("closing the audit log")
    }
}

/// Opens the log `settings` describe: reads the master key (creating one,
/// 0600, where there is none yet), recovers every partition and starts the
/// writer.
pub fn open(settings: &AuditSettings) -> anyhow::Result<AuditLog> {
    let master = if settings.key_file.exists() {
        read_master_key(&settings.key_file)?
    } else {
        create_key(&settings.key_file)?
    };
    let mut config = WriterConfig::new(&settings.dir);
    config.ring_capacity = usize::try_from(settings.ring_capacity).unwrap_or(usize::MAX);
    config.segment_max_bytes = settings.segment_max_bytes;
    config.segment_max_age = Duration::from_secs(settings.segment_max_age_secs);
    config.retention_max_bytes = settings.retention_max_bytes;
    config.retention_max_age = settings
        .retention_days
        .map(|d| Duration::from_secs(d.saturating_mul(86_400)));
    let mut observers: Vec<Box<dyn CommitObserver>> = Vec::new();
    let tail = match &settings.tail_socket {
        Some(path) => {
            let (server, observer) = TailServer::bind(path)?;
            observers.push(Box::new(observer));
            Some(server)
        }
        None => None,
    };
    let keys = Arc::new(AuditKeys::new(master.clone()));
    let writer = AuditWriter::start(master, config, observers)
        .with_context(|| format!("opening the audit log in {}", settings.dir.display()))?;
    let hook = AuditHook::new(writer.sink(), keys);
    Ok(AuditLog { writer, hook, tail })
}

fn create_key(path: &Path) -> anyhow::Result<bulkhead_core::audit::MasterKey> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = generate_master_key();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the audit master key {}", path.display()))?;
    writeln!(file, "{}", key.to_hex())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing the audit master key {}", path.display()))?;
    tracing::warn!(
        "created a new audit master key at {} (keep it: the log cannot be read or verified without it)",
        path.display()
    );
    Ok(key)
}

/// Every [`DROP_WINDOW`], one `KernelDrops` record per tenant (or for
/// unmapped sources) whose dropped-packet counter moved. The counters are
/// the kernel's exact per-tenant totals, so no count is lost between windows.
pub async fn record_kernel_drops(
    plane: Arc<Mutex<KernelPlane>>,
    flows: Arc<KernelFlows>,
    hook: AuditHook,
) {
    let mut last: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut window_start = unix_now_ns();
    let mut tick = tokio::time::interval(DROP_WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let read = |plane: &Mutex<KernelPlane>| {
        plane
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counters()
    };
    // The counters may predate this process (pinned maps): start from them.
    if let Ok(counters) = read(&plane) {
        for (slot, c) in counters {
            last.insert(slot, (c.ingress_dropped_packets, c.ingress_dropped_bytes));
        }
    }
    loop {
        tick.tick().await;
        let counters = match read(&plane) {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(
                    "reading the kernel counters for the audit failed: {}",
                    err.chain()
                );
                continue;
            }
        };
        let window_end = unix_now_ns();
        for (slot, c) in counters {
            let now = (c.ingress_dropped_packets, c.ingress_dropped_bytes);
            let before = last.insert(slot, now).unwrap_or((0, 0));
            let packets = now.0.saturating_sub(before.0);
            if packets == 0 {
                continue;
            }
            let tenant = if slot == UNKNOWN_TENANT {
                None
            } else {
                flows.tenant_of(slot)
            };
            let event = AuditEvent {
                time_unix_ns: window_end,
                kind: EventKind::KernelDrops(KernelDrops {
                    tenant,
                    window_start_unix_ns: window_start,
                    window_end_unix_ns: window_end,
                    packets,
                    bytes: now.1.saturating_sub(before.1),
                    events: 0,
                }),
            };
            hook.record(event).await;
        }
        window_start = window_end;
    }
}
