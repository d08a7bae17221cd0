//! The worker process: a unix socket in front of the engine.

use anyhow::{Context as _, bail};
use bulkhead_core::{
    TenantId,
    wire::{
        FrameDecoder, Hello, ProxyToWorker, RejectKind, Rejected, Role, WireError, WorkerToProxy,
        encode_frame,
    },
};
use bulkhead_kernels::{
    backend::Backend,
    cpu::CpuBackend,
    cuda::CudaBackend,
    engine::{Engine, EngineConfig},
    model::{ModelConfig, Weights, checkpoint},
    sim::{CostModel, SimBackend},
};
use rustix::net::RecvFlags;
use std::{
    io::{ErrorKind, Read as _, Write as _},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Which compute backend a worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// The CPU reference.
    Cpu,
    /// CUDA kernels on an NVIDIA GPU.
    Cuda,
    /// The cost model (no math).
    Sim,
}

/// How to run a worker.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The compute backend.
    pub backend: BackendChoice,
    /// The unix socket to listen on.
    pub listen: PathBuf,
    /// The GPU index (`cuda`).
    pub device: usize,
    /// Tenants served; `None` serves any tenant the proxy sends.
    pub tenants: Option<Vec<TenantId>>,
    /// KV blocks in the pool.
    pub blocks: usize,
    /// Batch slots.
    pub slots: usize,
    /// Most tokens in one step ([`EngineConfig::max_step_tokens`]).
    pub step_tokens: usize,
    /// Most prompt tokens per step of tenants over their share while one
    /// under it runs ([`EngineConfig::over_share_prompt_tokens`]).
    pub over_share_prompt_tokens: usize,
    /// Seed of the built-in model's weights.
    pub seed: u64,
    /// Cost-model calibration (`sim`).
    pub calibration: Option<PathBuf>,
    /// The id the proxy knows this worker by (echoed in its Hello).
    pub worker_id: u32,
    /// Whether a `sim` worker sleeps for each step's modelled time (real-time pacing).
    pub sim_realtime: bool,
    /// Other names requests may use for the model.
    pub model_aliases: Vec<String>,
    /// A Llama-family checkpoint to serve instead of the built-in model.
    pub model_dir: Option<PathBuf>,
    /// Lowers the checkpoint's context (the config's `max_context_tokens`).
    pub max_context: Option<usize>,
}

/// The model a worker serves: its shapes, and its weights unless the
/// backend computes nothing (`sim`).
fn model_of(opts: &WorkerOptions) -> anyhow::Result<(ModelConfig, Option<Weights>)> {
    let name = opts
        .model_aliases
        .first()
        .cloned()
        .unwrap_or_else(|| "checkpoint".to_owned());
    match (&opts.model_dir, opts.backend) {
        (None, BackendChoice::Sim) => Ok((ModelConfig::tiny(), None)),
        (None, _) => {
            let model = ModelConfig::tiny();
            let weights = Weights::from_seed(&model, opts.seed);
            Ok((model, Some(weights)))
        }
        (Some(dir), BackendChoice::Sim) => {
            Ok((checkpoint::check(dir, &name, opts.max_context)?, None))
        }
        (Some(dir), _) => {
            let started = Instant::now();
            let loaded = checkpoint::load(dir, &name, opts.max_context)?;
            tracing::info!(
                dir = %dir.display(),
                layers = loaded.config.layers,
                hidden = loaded.config.hidden,
                vocab = loaded.config.vocab,
                ms = started.elapsed().as_millis(),
                "checkpoint loaded"
            );
            Ok((loaded.config, Some(loaded.weights)))
        }
    }
}

/// Builds the engine the options describe.
pub fn build_engine(opts: &WorkerOptions) -> anyhow::Result<Engine<Box<dyn Backend>>> {
    let (model, weights) = model_of(opts)?;
    // A checkpoint takes its first alias as its name: not listed twice.
    let aliases: Vec<String> = opts
        .model_aliases
        .iter()
        .filter(|a| **a != model.name)
        .cloned()
        .collect();
    let backend: Box<dyn Backend> = match (opts.backend, weights) {
        (BackendChoice::Cpu, Some(weights)) => {
            Box::new(CpuBackend::new(model, weights, opts.blocks)?)
        }
        (BackendChoice::Cuda, Some(weights)) => Box::new(
            CudaBackend::new(model, &weights, opts.blocks, opts.device)
                .with_context(|| format!("the cuda backend on GPU {}", opts.device))?,
        ),
        (BackendChoice::Sim, _) => {
            let cost = match &opts.calibration {
                Some(path) => CostModel::from_file(path)?,
                None => CostModel::default(),
            };
            Box::new(SimBackend::new(model, opts.blocks, cost)?)
        }
        (BackendChoice::Cpu | BackendChoice::Cuda, None) => {
            unreachable!("model_of loads weights for every backend but sim")
        }
    };
    let cfg = EngineConfig {
        max_slots: opts.slots,
        max_step_tokens: opts.step_tokens,
        over_share_prompt_tokens: opts.over_share_prompt_tokens,
        tenants: opts.tenants.as_ref().map(|t| t.iter().cloned().collect()),
        model_aliases: aliases,
        ..EngineConfig::default()
    };
    Ok(Engine::new(backend, cfg))
}

/// Binds `path` (0600), replacing a stale socket but never a live one.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running worker", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    Ok(listener)
}

/// Serves proxies one connection at a time until one sends `Shutdown` and
/// the engine drains. Returns an error only when the worker cannot go on
/// (the socket, or the backend, failed).
pub fn serve(opts: &WorkerOptions) -> anyhow::Result<()> {
    let mut engine = build_engine(opts)?;
    let listener = bind(&opts.listen)?;
    let info = engine.info();
    tracing::info!(
        backend = ?info.backend,
        socket = %opts.listen.display(),
        blocks = info.total_blocks,
        slots = info.max_slots,
        "worker {} ready",
        opts.worker_id
    );
    let result = (|| {
        for stream in listener.incoming() {
            let stream = stream.context("accepting a proxy connection")?;
            match Connection::new(stream, opts)?.run(&mut engine)? {
                Ended::Shutdown => return Ok(()),
                Ended::Closed(why) => {
                    tracing::info!("proxy connection ended: {why}; waiting for the next");
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&opts.listen);
    result
}

/// How a connection ended.
enum Ended {
    /// The proxy asked the worker to stop, and it drained.
    Shutdown,
    /// The proxy went away or broke the stream; the worker goes on.
    Closed(String),
}

/// What the connection read.
enum Event {
    Message(ProxyToWorker),
    /// A frame whose payload is bad; the stream goes on.
    BadFrame(WireError),
    /// The stream is broken: a framing error; the frames after it can't be found.
    Broken(WireError),
    /// The stream closed or failed.
    End(String),
}

/// The proxy's connection, read and written on the engine's thread: while
/// the engine has work, only what has already arrived is taken between
/// steps (a non-blocking read); with nothing to run, a read waits up to
/// [`IDLE_WAIT`]. (A reader thread beside the engine cost a thread wake-up
/// and a context switch on both sides of every batch.) The proxy reads
/// and writes its end independently, so a worker blocked writing answers
/// is always drained, never deadlocked against its own unread input.
struct Connection {
    stream: UnixStream,
    decoder: FrameDecoder<ProxyToWorker>,
    buf: Vec<u8>,
    /// Why the stream ended, once it has (frames decoded before it still count).
    ended: Option<String>,
    worker_id: u32,
    /// `Some` when a `sim` worker keeps real time.
    pacer: Option<Pacer>,
    out: Vec<u8>,
}

/// The longest a read waits while the engine has nothing to run.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How long a new connection has to send its Hello.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// How far behind its modelled clock a `sim` worker may fall and still catch up.
const PACING_SLACK: Duration = Duration::from_millis(2);

/// The real-time clock of a `sim` worker: each step ends its modelled time
/// after the last one ended, while the engine runs straight on.
///
/// The host's own time between steps (planning, writing the answers, a
/// sleep's lateness) is inside the next step's modelled time, as it is on a
/// GPU, where the calibration's fixed cost per step already counts the
/// scheduler. Sleeping for the modelled time after that work, as the worker
/// did before, made every step longer by it (~0.2 ms a step, measured
/// beside a bursting tenant). A worker that idled (waited for a request
/// with nothing to run), or fell more than [`PACING_SLACK`] behind, starts
/// again from the present, so lost time is never made up at the expense of
/// requests that had not arrived. The one thing moved earlier is a request
/// that arrived during the host's work between two busy steps: it joins the
/// step that began at the last one's modelled end (at most the slack
/// before its arrival), as it would have been waiting there on a GPU.
#[derive(Debug, Default)]
struct Pacer {
    /// When the last step ends, in modelled time.
    until: Option<Instant>,
}

impl Pacer {
    /// The instant a step that began at `started` and models `time` ends.
    fn end(&mut self, started: Instant, time: Duration) -> Instant {
        let begin = match self.until {
            Some(last) if started.saturating_duration_since(last) <= PACING_SLACK => last,
            _ => started,
        };
        let end = begin + time;
        self.until = Some(end);
        end
    }

    /// The engine has nothing to run: the next step starts from its own present.
    fn idle(&mut self) {
        self.until = None;
    }
}

impl Connection {
    fn new(stream: UnixStream, opts: &WorkerOptions) -> anyhow::Result<Self> {
        stream
            .set_read_timeout(Some(IDLE_WAIT))
            .context("setting the connection's read timeout")?;
        Ok(Self {
            stream,
            decoder: FrameDecoder::new(),
            buf: vec![0u8; 64 * 1024],
            ended: None,
            worker_id: opts.worker_id,
            pacer: opts.sim_realtime.then(Pacer::default),
            out: Vec::new(),
        })
    }

    fn run<B: Backend>(mut self, engine: &mut Engine<B>) -> anyhow::Result<Ended> {
        if let Err(why) = self.handshake(engine) {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
            return Ok(Ended::Closed(why));
        }
        let ended = self.serve(engine);
        // Whatever ended the connection, nobody will read the answers of the
        // requests still running: cancel them and free their blocks.
        engine.cancel_all();
        let _ = engine.take_outbox();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        ended
    }

    /// The next thing read: a frame (good or bad), or the stream's end.
    /// With `wait`, blocks up to [`IDLE_WAIT`] for bytes; without, takes
    /// only what has arrived. `None`: nothing yet.
    fn next_event(&mut self, wait: bool) -> Option<Event> {
        loop {
            match self.decoder.next_message() {
                Ok(Some(m)) => return Some(Event::Message(m)),
                Ok(None) => {}
                Err(e) if self.decoder.is_poisoned() => return Some(Event::Broken(e)),
                Err(e) => return Some(Event::BadFrame(e)),
            }
            if let Some(why) = &self.ended {
                return Some(Event::End(why.clone()));
            }
            let read = if wait {
                (&self.stream).read(&mut self.buf)
            } else {
                rustix::net::recv(&self.stream, &mut self.buf[..], RecvFlags::DONTWAIT)
                    .map(|(n, _)| n)
                    .map_err(std::io::Error::from)
            };
            match read {
                Ok(0) => self.ended = Some("the proxy closed the connection".to_owned()),
                Ok(n) => self.decoder.push(&self.buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return None;
                }
                Err(e) => self.ended = Some(format!("reading from the proxy: {e}")),
            }
        }
    }

    fn handshake<B: Backend>(&mut self, engine: &mut Engine<B>) -> Result<(), String> {
        let deadline = Instant::now() + HELLO_WAIT;
        let first = loop {
            match self.next_event(true) {
                Some(Event::Message(m)) => break m,
                Some(Event::BadFrame(e)) => {
                    self.reject(None, RejectKind::MalformedFrame, e.to_string());
                    return Err(format!("malformed first frame: {e}"));
                }
                Some(Event::Broken(e)) => {
                    self.reject(None, RejectKind::MalformedFrame, e.to_string());
                    return Err(format!("broken stream: {e}"));
                }
                Some(Event::End(why)) => return Err(why),
                None if Instant::now() >= deadline => {
                    return Err(format!("no Hello within {HELLO_WAIT:?}"));
                }
                None => {}
            }
        };
        let ProxyToWorker::Hello(hello) = first else {
            self.reject(
                None,
                RejectKind::ProtocolViolation,
                "the first frame must be Hello".to_owned(),
            );
            return Err("the first frame was not Hello".to_owned());
        };
        if hello.role != Role::Proxy {
            self.reject(
                None,
                RejectKind::ProtocolViolation,
                "the peer's Hello is not a proxy's".to_owned(),
            );
            return Err("the peer is not a proxy".to_owned());
        }
        let reply = Hello::worker(self.worker_id, engine.info());
        engine.report_capacity_again();
        let mut first = vec![WorkerToProxy::Hello(reply)];
        first.extend(engine.take_outbox());
        self.write(&first)
            .map_err(|e| format!("writing Hello: {e}"))?;
        Ok(())
    }

    fn serve<B: Backend>(&mut self, engine: &mut Engine<B>) -> anyhow::Result<Ended> {
        loop {
            // Take everything that arrived; block only when there is nothing to run.
            loop {
                let idle = !engine.has_work();
                if idle && let Some(pacer) = self.pacer.as_mut() {
                    pacer.idle();
                }
                // Idle: wake now and then to report capacity changes (none today).
                let Some(event) = self.next_event(idle) else {
                    break;
                };
                match event {
                    Event::Message(m) => engine.handle(m),
                    Event::BadFrame(e) => {
                        tracing::warn!("skipped a malformed frame: {e}");
                        self.reject(None, RejectKind::MalformedFrame, e.to_string());
                    }
                    Event::Broken(e) => {
                        // Typed, then closed: nothing after a framing error can be trusted.
                        self.reject(None, RejectKind::MalformedFrame, e.to_string());
                        return Ok(Ended::Closed(format!("broken stream: {e}")));
                    }
                    Event::End(why) => return Ok(Ended::Closed(why)),
                }
                if !engine.has_work() {
                    break;
                }
            }
            if engine.has_work() {
                let started = Instant::now();
                let report = engine.step().context("the backend failed a step")?;
                if let Some(t) = report.and_then(|r| r.modelled_time)
                    && let Some(pacer) = self.pacer.as_mut()
                {
                    let end = pacer.end(started, t);
                    std::thread::sleep(end.saturating_duration_since(Instant::now()));
                }
            }
            let outbox = engine.take_outbox();
            if let Err(e) = self.write(&outbox) {
                return Ok(Ended::Closed(format!("writing to the proxy: {e}")));
            }
            if engine.is_drained() {
                return Ok(Ended::Shutdown);
            }
        }
    }

    fn reject(
        &mut self,
        request_id: Option<bulkhead_core::wire::RequestId>,
        kind: RejectKind,
        detail: String,
    ) {
        let _ = self.write(&[WorkerToProxy::Rejected(Rejected {
            request_id,
            kind,
            detail,
        })]);
    }

    fn write(&mut self, messages: &[WorkerToProxy]) -> std::io::Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        self.out.clear();
        for m in messages {
            encode_frame(m, &mut self.out).map_err(std::io::Error::other)?;
        }
        self.stream.write_all(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn back_to_back_steps_keep_the_modelled_clock_whatever_the_host_adds() {
        let t0 = Instant::now();
        let mut pacer = Pacer::default();
        assert_eq!(pacer.end(t0, 30 * MS), t0 + 30 * MS);
        // The host took 0.4 ms after the first step's end before the second began.
        let second = t0 + 30 * MS + MS * 2 / 5;
        assert_eq!(pacer.end(second, 40 * MS), t0 + 70 * MS);
        // And again, 1.9 ms late: still within the slack, still no drift.
        let third = t0 + 70 * MS + MS * 19 / 10;
        assert_eq!(pacer.end(third, 10 * MS), t0 + 80 * MS);
    }

    #[test]
    fn after_idling_or_falling_far_behind_the_clock_starts_from_now() {
        let t0 = Instant::now();
        let mut pacer = Pacer::default();
        pacer.end(t0, 30 * MS);
        // Idle for a second: the next step is not shortened by it.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(pacer.end(later, 30 * MS), later + 30 * MS);
        // 5 ms late (past the slack): no catching up either.
        let late = later + 30 * MS + 5 * MS;
        assert_eq!(pacer.end(late, 20 * MS), late + 20 * MS);
        // Idle, then a request 1 ms after the last step's end: its step
        // starts when it arrived, not at that end.
        pacer.idle();
        let soon = late + 20 * MS + MS;
        assert_eq!(pacer.end(soon, 20 * MS), soon + 20 * MS);
    }
}
