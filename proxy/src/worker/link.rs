//! The proxy's end of a worker connection (blocking).

use bulkhead_core::wire::{
    FrameDecoder, Hello, ProxyToWorker, WireError, WorkerInfo, WorkerToProxy, encode_frame,
};
use std::{
    io::{ErrorKind, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

/// Why talking to a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The worker's socket closed: the process exited or dropped us.
    #[error("worker {worker_id} went away (its socket closed){}", in_flight_note(*.in_flight))]
    WorkerGone {
        /// The worker.
        worker_id: u32,
        /// Whether bytes of an unfinished frame were pending.
        in_flight: bool,
    },
    /// No message within the timeout.
    #[error("worker {worker_id} sent nothing for {timeout:?}")]
    Timeout {
        /// The worker.
        worker_id: u32,
        /// The timeout.
        timeout: Duration,
    },
    /// The worker's bytes are not valid frames.
    #[error("worker {worker_id}: {source}")]
    Wire {
        /// The worker.
        worker_id: u32,
        /// What was wrong.
        source: WireError,
    },
    /// The handshake went wrong.
    #[error("worker handshake at {path}: {reason}")]
    Handshake {
        /// The socket.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A socket error.
    #[error("worker {worker_id}: {source}")]
    Io {
        /// The worker.
        worker_id: u32,
        /// The error.
        source: std::io::Error,
    },
}

fn in_flight_note(in_flight: bool) -> &'static str {
    if in_flight {
        ", in the middle of a frame"
    } else {
        ""
    }
}

/// A connected, handshaken worker.
#[derive(Debug)]
pub struct WorkerLink {
    stream: UnixStream,
    decoder: FrameDecoder<WorkerToProxy>,
    worker_id: u32,
    info: WorkerInfo,
    out: Vec<u8>,
}

impl WorkerLink {
    /// Connects to the worker at `path` and exchanges hellos within `timeout`.
    pub fn connect(path: &Path, worker_id: u32, timeout: Duration) -> Result<Self, LinkError> {
        let shown = path.display().to_string();
        let handshake = |reason: String| LinkError::Handshake {
            path: shown.clone(),
            reason,
        };
        let stream = UnixStream::connect(path).map_err(|e| handshake(format!("connect: {e}")))?;
        let mut link = Self {
            stream,
            decoder: FrameDecoder::new(),
            worker_id,
            info: WorkerInfo {
                backend: bulkhead_core::wire::WorkerBackend::Cpu,
                models: Vec::new(),
                max_slots: 0,
                total_blocks: 0,
                block_tokens: 0,
            },
            out: Vec::new(),
        };
        link.send(&ProxyToWorker::Hello(Hello::proxy(worker_id)))?;
        match link.recv_timeout(timeout)? {
            WorkerToProxy::Hello(hello) => {
                link.info = hello.into_worker_info(worker_id).map_err(handshake)?;
            }
            other => return Err(handshake(format!("expected Hello, got {other:?}"))),
        }
        Ok(link)
    }

    /// What the worker offers.
    pub const fn info(&self) -> &WorkerInfo {
        &self.info
    }

    /// Sends one message.
    pub fn send(&mut self, message: &ProxyToWorker) -> Result<(), LinkError> {
        self.out.clear();
        encode_frame(message, &mut self.out).map_err(|source| LinkError::Wire {
            worker_id: self.worker_id,
            source,
        })?;
        self.send_raw_inner()
    }

    /// Sends bytes as they are (tests of the worker's handling of bad frames).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.out.clear();
        self.out.extend_from_slice(bytes);
        self.send_raw_inner()
    }

    fn send_raw_inner(&mut self) -> Result<(), LinkError> {
        match self.stream.write_all(&self.out) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                Err(LinkError::WorkerGone {
                    worker_id: self.worker_id,
                    in_flight: false,
                })
            }
            Err(source) => Err(LinkError::Io {
                worker_id: self.worker_id,
                source,
            }),
        }
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<WorkerToProxy, LinkError> {
        let worker_id = self.worker_id;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.decoder.next_message() {
                Ok(Some(message)) => return Ok(message),
                Ok(None) => {}
                Err(source) => return Err(LinkError::Wire { worker_id, source }),
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout { worker_id, timeout });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| LinkError::Io { worker_id, source })?;
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(LinkError::WorkerGone {
                        worker_id,
                        in_flight: self.decoder.buffered_len() > 0,
                    });
                }
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(LinkError::Timeout { worker_id, timeout });
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Err(LinkError::WorkerGone {
                        worker_id,
                        in_flight: self.decoder.buffered_len() > 0,
                    });
                }
                Err(source) => return Err(LinkError::Io { worker_id, source }),
            }
        }
    }
}
