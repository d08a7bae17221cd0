//! `audit tail`: every durable record, as a JSON line, to clients of a unix
//! socket. A client sends one line first: `*` for every partition, or a
//! partition name. A client that cannot keep up is disconnected: the writer
//! never waits for one.

use super::AuditError;
use super::writer::{CommitObserver, Committed};
use bulkhead_core::audit::PartitionId;
use std::io::{self, BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes a client may have unsent before it is disconnected.
const MAX_PENDING: usize = 1 << 20;

struct Client {
    stream: UnixStream,
    filter: Option<PartitionId>,
    pending: Vec<u8>,
}

struct Shared {
    clients: Mutex<Vec<Client>>,
    stop: AtomicBool,
    dropped_clients: AtomicU64,
}

/// The listening socket; dropping it stops listening and removes the file.
pub struct TailServer {
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TailServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TailServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The writer's side of the tail: give it to [`super::AuditWriter::start`].
pub struct TailObserver {
    shared: Arc<Shared>,
}

impl TailServer {
    /// Listens on `path` (mode 0600; a stale socket there is replaced).
    pub fn bind(path: &Path) -> Result<(Self, TailObserver), AuditError> {
        let what = || format!("listening on the audit tail socket {}", path.display());
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(AuditError::io(what(), e)),
        }
        let listener = UnixListener::bind(path).map_err(|e| AuditError::io(what(), e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| listener.set_nonblocking(true))
            .map_err(|e| AuditError::io(what(), e))?;
        let shared = Arc::new(Shared {
            clients: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            dropped_clients: AtomicU64::new(0),
        });
        let accept = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("audit-tail".into())
            .spawn(move || accept_loop(&listener, &accept))
            .map_err(|e| AuditError::io(what(), e))?;
        Ok((
            Self {
                path: path.to_owned(),
                shared: Arc::clone(&shared),
                thread: Some(thread),
            },
            TailObserver { shared },
        ))
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.shared
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Clients disconnected for falling behind (or failing).
    pub fn dropped_clients(&self) -> u64 {
        self.shared.dropped_clients.load(Ordering::Relaxed)
    }
}

impl Drop for TailServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => match subscribe(stream) {
                Ok(client) => shared
                    .clients
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(client),
                Err(e) => tracing::debug!(error = %e, "audit tail client refused"),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit tail accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads the client's subscription line.
fn subscribe(stream: UnixStream) -> io::Result<Client> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(io::Read::take(&stream, 128)).read_line(&mut line)?;
    let filter = match line.trim() {
        "*" | "" => None,
        name => Some(
            PartitionId::parse(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        ),
    };
    stream.set_nonblocking(true)?;
    Ok(Client {
        stream,
        filter,
        pending: Vec::new(),
    })
}

impl CommitObserver for TailObserver {
    fn committed(&mut self, records: &[Committed<'_>]) {
        let mut clients = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if clients.is_empty() {
            return;
        }
        for r in records {
            let mut line = r.event.to_json(r.partition, r.seq).to_string();
            line.push('\n');
            for c in clients.iter_mut() {
                if c.filter.as_ref().is_none_or(|f| f == r.partition) {
                    c.pending.extend_from_slice(line.as_bytes());
                }
            }
        }
        let before = clients.len();
        clients.retain_mut(|c| {
            while !c.pending.is_empty() {
                match c.stream.write(&c.pending) {
                    Ok(0) => return false,
                    Ok(n) => {
                        c.pending.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return c.pending.len() <= MAX_PENDING;
                    }
                    Err(_) => return false,
                }
            }
            true
        });
        let dropped = before - clients.len();
        if dropped > 0 {
            self.shared
                .dropped_clients
                .fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                "audit tail client(s) disconnected (too slow, or gone)"
            );
        }
    }
}
