//! One task per worker: start it, connect, shuttle frames, and start it again when it dies.

use super::{WorkerSpec, state::Shared};
use bulkhead_core::wire::{
    FrameDecoder, Hello, ProxyToWorker, WorkerInfo, WorkerToProxy, encode_frame,
};
use std::{sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
    process::{Child, Command},
    sync::mpsc,
};

/// How long a started worker may take to listen and say hello.
const START_TIMEOUT: Duration = Duration::from_mins(1);

/// The longest wait before restarting a worker that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long was healthy: its next restart waits the base time again.
const HEALTHY_RUN: Duration = Duration::from_mins(1);

/// Runs worker `index` for the life of the process.
pub async fn run(shared: Arc<Shared>, index: usize, spec: WorkerSpec, backoff: Duration) {
    let mut wait = Duration::ZERO;
    loop {
        let started = tokio::time::Instant::now();
        let why = match session(&shared, index, &spec).await {
            Ok(why) | Err(why) => why,
        };
        wait = next_wait(wait, backoff, started.elapsed());
        tracing::warn!("worker {} is down: {why}; restarting in {wait:?}", spec.id);
        shared.lock().worker_down(index, &why);
        tokio::time::sleep(wait).await;
    }
}

/// The wait before the next restart: `base` after a healthy run, doubling
/// (up to [`MAX_BACKOFF`]) while the worker keeps failing soon after start.
fn next_wait(previous: Duration, base: Duration, lived: Duration) -> Duration {
    if lived >= HEALTHY_RUN || previous.is_zero() {
        base
    } else {
        (previous * 2).min(MAX_BACKOFF.max(base))
    }
}

/// One life of the worker: start (if ours), connect, serve until it ends.
async fn session(shared: &Arc<Shared>, index: usize, spec: &WorkerSpec) -> Result<String, String> {
    let mut child = match &spec.spawn_args {
        Some(args) => Some(spawn(spec, args)?),
        None => None,
    };
    let stream = connect(spec, child.as_mut()).await?;
    let (mut reader, mut writer) = stream.into_split();
    let mut decoder = FrameDecoder::<WorkerToProxy>::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();

    encode_frame(&ProxyToWorker::Hello(Hello::proxy(spec.id)), &mut out)
        .map_err(|e| e.to_string())?;
    writer
        .write_all(&out)
        .await
        .map_err(|e| format!("writing Hello: {e}"))?;
    let info = tokio::time::timeout(
        START_TIMEOUT,
        read_hello(&mut reader, &mut decoder, &mut buf, spec.id),
    )
    .await
    .map_err(|_| "no Hello from the worker".to_owned())??;
    tracing::info!(
        "worker {} up: {:?}, models {:?}, {} slots, {} KV blocks",
        spec.id,
        info.backend,
        info.models,
        info.max_slots,
        info.total_blocks
    );
    let (tx, rx) = mpsc::unbounded_channel::<ProxyToWorker>();
    shared.lock().worker_up(index, tx, info);
    // Frames buffered with the Hello.
    drain(shared, index, &mut decoder)?;
    // Writes go on in a task of their own: the worker's answers are read
    // whatever is being written to it, so a worker blocked writing them
    // (it reads and writes on one thread) is never left waiting on us.
    // A JoinSet aborts its task when dropped, i.e. when this session ends.
    let mut writing = tokio::task::JoinSet::new();
    writing.spawn(write_frames(writer, rx, out));

    loop {
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) => return Ok("its socket closed".to_owned()),
                Ok(n) => {
                    crate::serve::busy_poll::activity(crate::serve::busy_poll::Activity::Worker);
                    decoder.push(&buf[..n]);
                    drain(shared, index, &mut decoder)?;
                }
                Err(e) => return Err(format!("reading: {e}")),
            },
            Some(written) = writing.join_next() => {
                return written.unwrap_or_else(|e| Err(format!("the writing task failed: {e}")));
            }
            status = wait_child(child.as_mut()) => {
                return Ok(format!("its process exited ({status})"));
            }
        }
    }
}

/// Writes the dispatcher's messages to the worker, batching whatever is
/// waiting into one write; returns why it stopped.
async fn write_frames(
    mut writer: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<ProxyToWorker>,
    mut out: Vec<u8>,
) -> Result<String, String> {
    // Messages in the last write: more than one means requests are coming
    // together, and waiting a turn lets the next write carry more of them.
    let mut last_batch = 0_usize;
    while let Some(message) = rx.recv().await {
        // Under load, let the other tasks that are ready run first: they are
        // requests about to submit, and one write then carries them all
        // (measured: ~0.43 writes a request without this, 0.04-0.07 with
        // it). One request at a time, the turn would only delay it: ~3 µs
        // here, from the dispatch event to the write.
        if last_batch > 1 {
            tokio::task::yield_now().await;
        }
        out.clear();
        encode_frame(&message, &mut out).map_err(|e| e.to_string())?;
        last_batch = 1;
        while let Ok(more) = rx.try_recv() {
            encode_frame(&more, &mut out).map_err(|e| e.to_string())?;
            last_batch += 1;
        }
        writer
            .write_all(&out)
            .await
            .map_err(|e| format!("writing: {e}"))?;
    }
    Ok("dispatcher gone".to_owned())
}

fn drain(
    shared: &Arc<Shared>,
    index: usize,
    decoder: &mut FrameDecoder<WorkerToProxy>,
) -> Result<(), String> {
    loop {
        match decoder.next_message() {
            Ok(Some(m)) => shared.lock().on_frame(index, m),
            Ok(None) => return Ok(()),
            Err(e) if decoder.is_poisoned() => return Err(format!("broken stream: {e}")),
            Err(e) => tracing::warn!("skipped a malformed frame from a worker: {e}"),
        }
    }
}

async fn read_hello(
    reader: &mut tokio::net::unix::OwnedReadHalf,
    decoder: &mut FrameDecoder<WorkerToProxy>,
    buf: &mut [u8],
    id: u32,
) -> Result<WorkerInfo, String> {
    loop {
        match decoder.next_message() {
            Ok(Some(WorkerToProxy::Hello(hello))) => return hello.into_worker_info(id),
            Ok(Some(other)) => return Err(format!("expected Hello, got {other:?}")),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let n = reader.read(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the worker closed the connection during the handshake".to_owned());
        }
        decoder.push(&buf[..n]);
    }
}

fn spawn(spec: &WorkerSpec, args: &[String]) -> Result<Child, String> {
    let exe = match &spec.program {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| format!("finding our own binary: {e}"))?,
    };
    Command::new(exe)
        .arg("worker")
        .arg("--listen")
        .arg(&spec.socket)
        .arg("--worker-id")
        .arg(spec.id.to_string())
        // A worker must not outlive us, even if we are killed without cleanup.
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting the worker: {e}"))
}

async fn connect(spec: &WorkerSpec, mut child: Option<&mut Child>) -> Result<UnixStream, String> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        match UnixStream::connect(&spec.socket).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("connecting to {}: {e}", spec.socket.display()));
            }
            Err(_) => {}
        }
        if let Some(c) = child.as_deref_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            return Err(format!("the worker exited before listening ({status})"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_child(child: Option<&mut Child>) -> String {
    match child {
        Some(c) => c
            .wait()
            .await
            .map_or_else(|e| e.to_string(), |s| s.to_string()),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_while_failing_and_reset_after_a_healthy_run() {
        let base = Duration::from_millis(500);
        let quick = Duration::from_millis(10);
        let mut wait = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..9 {
            wait = next_wait(wait, base, quick);
            waits.push(wait.as_millis());
        }
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(next_wait(wait, base, HEALTHY_RUN), base);
    }
}
