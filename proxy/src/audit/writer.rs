//! The writer thread: drains the ring in groups, seals and chains each event
//! into its partition's current segment, writes and fsyncs every partition
//! the group touched, then raises the durable watermark.

use super::ring::{AuditSink, Entry, Shared, Ticket};
use super::{AuditError, unix_now_ns};
use bulkhead_core::audit::{
    AuditEvent, ChainHash, EventKind, HEADER_LEN, MasterKey, PartitionId, Recovered, SegmentHeader,
    SegmentSealer, SegmentTail, TenantKey, genesis_chain, parse_segment_file_name, scan_segment,
    segment_file_name,
};
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Where and how the writer keeps the log.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// The log's directory: one subdirectory per partition.
    pub dir: PathBuf,
    /// Events the ring holds before producers wait.
    pub ring_capacity: usize,
    /// Most events in one group commit.
    pub max_batch: usize,
    /// A segment is closed once it reaches this size ...
    pub segment_max_bytes: u64,
    /// ... or this age (if it holds any record).
    pub segment_max_age: Duration,
    /// Per partition: oldest segments are deleted while the partition is larger.
    pub retention_max_bytes: Option<u64>,
    /// Per partition: segments last written longer ago are deleted.
    pub retention_max_age: Option<Duration>,
    /// How often an idle writer checks segment ages.
    pub tick: Duration,
    /// How long the writer lets a group fill after its first event before
    /// writing and fsyncing it (producers never wait for this).
    pub linger: Duration,
}

impl WriterConfig {
    /// Defaults: a 65,536-event ring, 64 MiB or 1 h segments, no retention limit.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ring_capacity: 65_536,
            max_batch: 65_536,
            segment_max_bytes: 64 << 20,
            segment_max_age: Duration::from_hours(1),
            retention_max_bytes: None,
            retention_max_age: None,
            tick: Duration::from_millis(100),
            // 10 ms, not 2: a fifth of the wake-ups and fsyncs per partition
            // at low rates, which disturbed the proxy's other threads on a
            // small host (one request at a time through `bench proxy`: 8-11
            // µs less added p50 over three pairs); at most 10 ms of records
            // wait in memory, as before at most 2.
            linger: Duration::from_millis(10),
        }
    }
}

/// One durable record, as the writer hands it to a [`CommitObserver`].
#[derive(Debug)]
pub struct Committed<'a> {
    /// Its partition.
    pub partition: &'a PartitionId,
    /// Its seq in the partition.
    pub seq: u64,
    /// The producer's ticket (0 for the writer's own `Recovered` events).
    pub ticket: Ticket,
    /// The event.
    pub event: &'a AuditEvent,
}

/// Sees every group of records once it is durable (on the writer thread:
/// must not block).
pub trait CommitObserver: Send {
    /// `records` are durable.
    fn committed(&mut self, records: &[Committed<'_>]);
}

/// The running writer: owns the thread; [`AuditWriter::sink`] hands out
/// producer handles.
pub struct AuditWriter {
    sink: AuditSink,
    thread: Option<JoinHandle<Result<(), AuditError>>>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("sink", &self.sink)
            .finish_non_exhaustive()
    }
}

impl AuditWriter {
    /// Opens the log (recovering every partition: a torn tail is cut, and
    /// recorded), then starts the writer thread.
    pub fn start(
        master: MasterKey,
        config: WriterConfig,
        observers: Vec<Box<dyn CommitObserver>>,
    ) -> Result<Self, AuditError> {
        let sink = AuditSink::new(config.ring_capacity);
        let mut writer = Writer::open(master, config, sink.clone(), observers)?;
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| AuditError::io("starting the audit writer thread", e))?;
        Ok(Self {
            sink,
            thread: Some(thread),
        })
    }

    /// A producer handle.
    pub fn sink(&self) -> AuditSink {
        self.sink.clone()
    }

    /// Stops taking events, writes everything already in the ring, and waits
    /// for the writer to finish.
    pub fn shutdown(mut self) -> Result<(), AuditError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), AuditError> {
        self.sink.shared().close();
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(AuditError::WriterPanicked),
        }
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "audit writer stopped with an error");
        }
    }
}

struct OpenSegment {
    number: u32,
    file: File,
    sealer: SegmentSealer,
    /// Bytes known durable.
    len: u64,
    opened: Instant,
}

struct Partition {
    id: PartitionId,
    key: TenantKey,
    dir: PathBuf,
    current: Option<OpenSegment>,
    next_segment: u32,
    /// The durable end of the chain.
    seq: u64,
    chain: ChainHash,
    buf: Vec<u8>,
}

struct Writer {
    master: MasterKey,
    config: WriterConfig,
    sink: AuditSink,
    partitions: HashMap<PartitionId, Partition>,
    observers: Vec<Box<dyn CommitObserver>>,
}

/// Calls `writer_stopped` however the writer thread ends (panics included),
/// so no producer or waiter hangs on a dead writer.
struct StopGuard<'a>(&'a Shared);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.0.writer_stopped();
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn create_dir_private(dir: &Path) -> io::Result<bool> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// A partition directory's segments, in increasing number.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            out.push((n, entry.path()));
        }
    }
    out.sort_unstable_by_key(|s| s.0);
    Ok(out)
}

impl Writer {
    fn open(
        master: MasterKey,
        config: WriterConfig,
        sink: AuditSink,
        observers: Vec<Box<dyn CommitObserver>>,
    ) -> Result<Self, AuditError> {
        let what = || format!("creating the audit directory {}", config.dir.display());
        if let Some(parent) = config.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| AuditError::io(what(), e))?;
        }
        create_dir_private(&config.dir).map_err(|e| AuditError::io(what(), e))?;
        let mut writer = Self {
            master,
            config,
            sink,
            partitions: HashMap::new(),
            observers,
        };
        let entries = fs::read_dir(&writer.config.dir).map_err(|e| {
            AuditError::io(
                format!(
                    "reading the audit directory {}",
                    writer.config.dir.display()
                ),
                e,
            )
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| AuditError::io("reading the audit directory", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match PartitionId::parse(&name) {
                Ok(p) if entry.path().is_dir() => names.push(p),
                _ => tracing::warn!(entry = %name, "not an audit partition; ignored"),
            }
        }
        names.sort();
        for id in names {
            let (partition, recovered) = writer.recover(&id)?;
            writer.partitions.insert(id.clone(), partition);
            if let Some(recovered) = recovered {
                let event = AuditEvent {
                    time_unix_ns: unix_now_ns(),
                    kind: EventKind::Recovered(recovered),
                };
                let entry = Entry {
                    ticket: Ticket(0),
                    event,
                };
                writer.commit_partition(&id, std::slice::from_ref(&entry), &[0])?;
            }
        }
        Ok(writer)
    }

    fn new_partition(&self, id: &PartitionId) -> Partition {
        Partition {
            id: id.clone(),
            key: self.master.tenant_key(id),
            dir: self.config.dir.join(id.as_str()),
            current: None,
            next_segment: 1,
            seq: 0,
            chain: genesis_chain(id),
            buf: Vec::with_capacity(64 << 10),
        }
    }

    /// Finds where `id`'s chain ends: cuts a torn tail off its newest
    /// segment; damage that is not a torn tail is left for `verify`.
    fn recover(&self, id: &PartitionId) -> Result<(Partition, Option<Recovered>), AuditError> {
        let mut p = self.new_partition(id);
        let io_err = |what: &str, e| AuditError::io(format!("{what} (partition {id})"), e);
        for entry in fs::read_dir(&p.dir).map_err(|e| io_err("listing segments", e))? {
            let path = entry.map_err(|e| io_err("listing segments", e))?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                // A segment whose creation did not finish: no record is in it.
                fs::remove_file(&path).map_err(|e| io_err("removing an unfinished segment", e))?;
            }
        }
        let segments = list_segments(&p.dir).map_err(|e| io_err("listing segments", e))?;
        p.next_segment = segments.last().map_or(Ok(1), |(n, _)| {
            n.checked_add(1)
                .ok_or_else(|| AuditError::SegmentNumbersExhausted(id.clone()))
        })?;
        let mut recovered = None;
        for (newest, (number, path)) in segments.iter().rev().enumerate() {
            let bytes = fs::read(path).map_err(|e| io_err("reading the newest segment", e))?;
            let scan = scan_segment(id, *number, &bytes);
            let Some(header) = &scan.header else {
                tracing::error!(partition = %id, segment = number, "segment header unreadable; continuing the chain from an older segment");
                continue;
            };
            if header.key_id != p.key.key_id() {
                return Err(AuditError::KeyMismatch {
                    partition: id.clone(),
                    found: header.key_id,
                    expected: p.key.key_id(),
                });
            }
            let (mut cut, mut damaged) = (0, 0);
            match scan.tail {
                SegmentTail::Clean => {}
                SegmentTail::Torn { bytes: torn, .. } if newest == 0 => {
                    let file = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(|e| io_err("opening a torn segment", e))?;
                    file.set_len(scan.valid_len as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| io_err("cutting a torn tail", e))?;
                    cut = torn;
                    tracing::warn!(partition = %id, segment = number, cut_bytes = torn, "cut the torn tail a crash left");
                }
                SegmentTail::Torn { .. } | SegmentTail::Bad { .. } => {
                    damaged = (bytes.len() - scan.valid_len) as u64;
                    tracing::error!(partition = %id, segment = number, damaged_bytes = damaged, "segment damaged after its last valid record; left in place for `audit verify`");
                }
            }
            p.seq = scan.end_seq;
            p.chain = scan.end_chain;
            if cut > 0 || damaged > 0 {
                recovered = Some(Recovered {
                    segment: *number,
                    cut_bytes: cut,
                    damaged_bytes: damaged,
                });
            }
            break;
        }
        Ok((p, recovered))
    }

    fn run(&mut self) -> Result<(), AuditError> {
        let sink = self.sink.clone();
        let shared = sink.shared();
        let _guard = StopGuard(shared);
        let mut batch = VecDeque::with_capacity(self.config.ring_capacity);
        loop {
            batch.clear();
            let more = shared.take_batch(
                &mut batch,
                self.config.max_batch,
                self.config.tick,
                self.config.linger,
            );
            if !batch.is_empty() {
                self.commit_batch(batch.make_contiguous())?;
            }
            self.rotate_by_age();
            if !more {
                return Ok(());
            }
        }
    }

    fn commit_batch(&mut self, batch: &[Entry]) -> Result<(), AuditError> {
        let mut groups: Vec<(PartitionId, Vec<usize>)> = Vec::new();
        let mut index: HashMap<PartitionId, usize> = HashMap::new();
        for (i, entry) in batch.iter().enumerate() {
            let id = entry.event.partition();
            let g = *index.entry(id.clone()).or_insert_with(|| {
                groups.push((id, Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i);
        }
        let mut committed = Vec::with_capacity(batch.len());
        for (id, indices) in &groups {
            let seqs = self.commit_partition(id, batch, indices)?;
            committed.extend(seqs.into_iter().map(|(seq, i)| (id.clone(), seq, i)));
        }
        let shared = self.sink.shared();
        shared.groups.fetch_add(1, Ordering::Relaxed);
        shared
            .written
            .fetch_add(committed.len() as u64, Ordering::Relaxed);
        // Observers first: once a producer sees its ticket durable, every
        // observer (the tail, an ack printer) has seen its record.
        if !self.observers.is_empty() {
            let records: Vec<_> = committed
                .iter()
                .map(|(id, seq, i)| Committed {
                    partition: id,
                    seq: *seq,
                    ticket: batch[*i].ticket,
                    event: &batch[*i].event,
                })
                .collect();
            for o in &mut self.observers {
                o.committed(&records);
            }
        }
        if let Some(last) = batch.last() {
            shared.mark_durable(last.ticket);
        }
        Ok(())
    }

    /// Seals `batch[indices]` into `id`'s partition and makes them durable,
    /// retrying on a fresh segment after an I/O error.
    fn commit_partition(
        &mut self,
        id: &PartitionId,
        batch: &[Entry],
        indices: &[usize],
    ) -> Result<Vec<(u64, usize)>, AuditError> {
        if !self.partitions.contains_key(id) {
            let p = self.new_partition(id);
            self.partitions.insert(id.clone(), p);
        }
        let shared = self.sink.shared();
        let p = self
            .partitions
            .get_mut(id)
            .expect("the partition was just inserted");
        let mut attempt = 0u32;
        loop {
            match p.append(batch, indices, shared) {
                Ok(seqs) => return Ok(seqs),
                Err(e) => {
                    shared.write_errors.fetch_add(1, Ordering::Relaxed);
                    p.abandon_segment();
                    attempt += 1;
                    tracing::error!(partition = %id, attempt, error = %e, "audit write failed; retrying on a new segment (producers back up meanwhile)");
                    if attempt >= 5 && shared.is_closed() {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(50 << attempt.min(5)));
                }
            }
        }
    }

    /// Closes segments that reached their age; applies retention after.
    fn rotate_by_age(&mut self) {
        let max_age = self.config.segment_max_age;
        let max_bytes = self.config.segment_max_bytes;
        let mut rotated = Vec::new();
        for p in self.partitions.values_mut() {
            if p.current.as_ref().is_some_and(|s| {
                s.len >= max_bytes || (s.opened.elapsed() >= max_age && s.sealer.records() > 0)
            }) {
                p.current = None;
                rotated.push(p.id.clone());
            }
        }
        for id in rotated {
            if let Err(e) = self.apply_retention(&id) {
                tracing::error!(partition = %id, error = %e, "audit retention failed");
            }
        }
    }

    /// Deletes `id`'s oldest segments past the size or age limit, never the newest.
    fn apply_retention(&self, id: &PartitionId) -> io::Result<()> {
        let (max_bytes, max_age) = (
            self.config.retention_max_bytes,
            self.config.retention_max_age,
        );
        if max_bytes.is_none() && max_age.is_none() {
            return Ok(());
        }
        let Some(p) = self.partitions.get(id) else {
            return Ok(());
        };
        let mut segments = Vec::new();
        for (n, path) in list_segments(&p.dir)? {
            let meta = fs::metadata(&path)?;
            segments.push((n, path, meta.len(), meta.modified()?));
        }
        let mut total: u64 = segments.iter().map(|s| s.2).sum();
        let now = SystemTime::now();
        let current = p.current.as_ref().map(|s| s.number);
        let mut removed = false;
        // Never the newest segment, nor the one being written.
        let keep_from = segments.len().saturating_sub(1);
        for (n, path, len, modified) in &segments[..keep_from] {
            if Some(*n) == current {
                break;
            }
            let too_big = max_bytes.is_some_and(|m| total > m);
            let too_old =
                max_age.is_some_and(|a| now.duration_since(*modified).is_ok_and(|age| age >= a));
            if !(too_big || too_old) {
                break;
            }
            fs::remove_file(path)?;
            total -= len;
            removed = true;
            tracing::info!(partition = %id, segment = n, bytes = len, "audit retention removed a segment");
        }
        if removed {
            sync_dir(&p.dir)?;
        }
        Ok(())
    }
}

impl Partition {
    /// Seals the entries into the current segment (opening one if needed),
    /// writes and fsyncs them; returns each one's seq and batch index.
    fn append(
        &mut self,
        batch: &[Entry],
        indices: &[usize],
        shared: &Shared,
    ) -> Result<Vec<(u64, usize)>, AuditError> {
        if self.current.is_none() {
            self.current = Some(self.create_segment()?);
        }
        let seg = self.current.as_mut().expect("a segment was just opened");
        self.buf.clear();
        let mut seqs = Vec::with_capacity(indices.len());
        for &i in indices {
            match seg.sealer.seal(&batch[i].event, &mut self.buf) {
                Ok(seq) => seqs.push((seq, i)),
                Err(e) => {
                    shared.seal_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(partition = %self.id, kind = batch[i].event.kind.name(), error = %e, "audit event could not be sealed");
                }
            }
        }
        let what = |w: &str| format!("{w} segment {} of partition {}", seg.number, self.id);
        seg.file
            .write_all(&self.buf)
            .map_err(|e| AuditError::io(what("writing"), e))?;
        seg.file
            .sync_data()
            .map_err(|e| AuditError::io(what("fsyncing"), e))?;
        seg.len += self.buf.len() as u64;
        self.seq = seg.sealer.last_seq();
        self.chain = seg.sealer.last_chain();
        Ok(seqs)
    }

    /// After a failed write: cut the segment back to what was durable and
    /// stop using it; the next write opens a new segment.
    fn abandon_segment(&mut self) {
        if let Some(seg) = self.current.take()
            && let Err(e) = seg.file.set_len(seg.len).and_then(|()| seg.file.sync_all())
        {
            tracing::error!(partition = %self.id, segment = seg.number, error = %e, "could not cut a failed segment back; `audit verify` will report it");
        }
    }

    /// Creates the next segment atomically (header written and fsynced under
    /// a temporary name, then renamed), continuing the durable chain.
    fn create_segment(&mut self) -> Result<OpenSegment, AuditError> {
        let io = |what: &str, e| AuditError::io(format!("{what} (partition {})", self.id), e);
        if create_dir_private(&self.dir).map_err(|e| io("creating the partition directory", e))? {
            sync_dir(self.dir.parent().unwrap_or(Path::new(".")))
                .map_err(|e| io("syncing the audit directory", e))?;
        }
        let number = self.next_segment;
        self.next_segment = number
            .checked_add(1)
            .ok_or_else(|| AuditError::SegmentNumbersExhausted(self.id.clone()))?;
        let header = SegmentHeader {
            segment: number,
            key_id: self.key.key_id(),
            created_unix_ns: unix_now_ns(),
            prev_seq: self.seq,
            prev_chain: self.chain,
            partition: self.id.clone(),
        };
        let path = self.dir.join(segment_file_name(number));
        let tmp = path.with_extension("seg.tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("creating a segment", e))?;
        file.write_all(&header.encode())
            .and_then(|()| file.sync_all())
            .and_then(|()| fs::rename(&tmp, &path))
            .and_then(|()| sync_dir(&self.dir))
            .map_err(|e| io("creating a segment", e))?;
        let sealer =
            SegmentSealer::new(&self.key, &header).map_err(|e| AuditError::Seal(e.to_string()))?;
        Ok(OpenSegment {
            number,
            file,
            sealer,
            len: HEADER_LEN as u64,
            opened: Instant::now(),
        })
    }
}
