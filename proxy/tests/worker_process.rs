//! `bulkhead worker` as a process: the proxy's link runs requests through it,
//! bad input gets typed refusals without taking it down, a proxy that goes
//! away has its requests cancelled, and a worker that dies is an error to
//! its proxy at once, not a hang.

use bulkhead::worker::{LinkError, WorkerLink};
use bulkhead_core::{
    TenantId,
    wire::{
        FinishReason, Finished, ProxyToWorker, RejectKind, Rejected, RequestId, Sampling, Submit,
        WIRE_VERSION, WorkerBackend, WorkerToProxy,
    },
};
use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const WAIT: Duration = Duration::from_mins(1);

struct Worker {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Worker {
    fn start(name: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("bh-worker-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("worker.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .args(["worker", "--listen"])
            .arg(&socket)
            .args(["--blocks", "256", "--worker-id", "3"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the worker never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, dir, socket }
    }

    fn link(&self) -> WorkerLink {
        WorkerLink::connect(&self.socket, 3, WAIT).unwrap()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn submit(id: u128, tenant: &str, prompt: Vec<u32>, max_tokens: u32) -> ProxyToWorker {
    ProxyToWorker::Submit(Submit {
        request_id: RequestId(id),
        tenant: TenantId::new(tenant).unwrap(),
        model: "bulkhead-tiny".to_owned(),
        prompt_tokens: prompt,
        max_tokens,
        sampling: Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: Some(1),
            stop: vec![],
        },
        kv_block_quota: 64,
    })
}

fn prompt(len: u32) -> Vec<u32> {
    std::iter::once(256)
        .chain((1..len).map(|i| 32 + i % 90))
        .collect()
}

/// The next message that isn't a capacity report.
fn recv_skipping_capacity(link: &mut WorkerLink) -> Result<WorkerToProxy, LinkError> {
    loop {
        match link.recv_timeout(WAIT)? {
            WorkerToProxy::Capacity(_) => {}
            other => return Ok(other),
        }
    }
}

#[derive(Debug, Default)]
struct Seen {
    tokens: HashMap<RequestId, Vec<u32>>,
    finished: HashMap<RequestId, Finished>,
    rejected: Vec<Rejected>,
}

/// Receives until every id in `ids` has its Finished.
fn collect(link: &mut WorkerLink, ids: &[u128], seen: &mut Seen) {
    while !ids
        .iter()
        .all(|id| seen.finished.contains_key(&RequestId(*id)))
    {
        match link.recv_timeout(WAIT).unwrap() {
            WorkerToProxy::Tokens {
                request_id,
                first_index,
                tokens,
            } => {
                let got = seen.tokens.entry(request_id).or_default();
                assert_eq!(first_index as usize, got.len());
                got.extend(tokens);
            }
            WorkerToProxy::Finished(f) => {
                assert!(seen.finished.insert(f.request_id, f).is_none());
            }
            WorkerToProxy::Rejected(r) => seen.rejected.push(r),
            WorkerToProxy::Violation(v) => panic!("unexpected violation {v:?}"),
            WorkerToProxy::Capacity(_) | WorkerToProxy::Hello(_) => {}
        }
    }
}

#[test]
fn requests_run_and_bad_input_gets_typed_refusals() {
    let worker = Worker::start(
        "serve",
        &["--backend", "cpu", "--tenants", "acme,globex,hooli"],
    );
    let mut link = worker.link();
    assert_eq!(link.info().backend, WorkerBackend::Cpu);
    assert_eq!(link.info().models, ["bulkhead-tiny"]);
    assert_eq!(link.info().total_blocks, 256);

    link.send(&submit(1, "acme", prompt(30), 6)).unwrap();
    link.send(&submit(2, "globex", prompt(30), 6)).unwrap();
    // A frame with a valid header and a garbage payload: skipped with a typed refusal.
    let mut bad = 3u32.to_be_bytes().to_vec();
    bad.extend_from_slice(&WIRE_VERSION.to_be_bytes());
    bad.push(99);
    link.send_raw(&bad).unwrap();
    link.send(&submit(3, "initech", prompt(5), 2)).unwrap();
    link.send(&submit(4, "acme", prompt(2_048), 2)).unwrap();
    let mut lower_quota = submit(5, "globex", prompt(100), 2);
    if let ProxyToWorker::Submit(s) = &mut lower_quota {
        s.kv_block_quota = 2;
        s.tenant = TenantId::new("acme").unwrap();
    }
    // acme already has a quota of 64 from request 1: a lower one doesn't shrink it.
    link.send(&lower_quota).unwrap();
    let mut seen = Seen::default();
    collect(&mut link, &[1, 2, 3, 4, 5], &mut seen);

    for id in [1, 2] {
        let f = &seen.finished[&RequestId(id)];
        assert_eq!(f.reason, FinishReason::Length, "{f:?}");
        assert_eq!(seen.tokens[&RequestId(id)].len(), 6);
    }
    assert_eq!(seen.tokens[&RequestId(1)], seen.tokens[&RequestId(2)]);
    let kinds: Vec<(Option<RequestId>, RejectKind)> = seen
        .rejected
        .iter()
        .map(|r| (r.request_id, r.kind))
        .collect();
    assert!(
        kinds.contains(&(None, RejectKind::MalformedFrame)),
        "{kinds:?}"
    );
    assert!(kinds.contains(&(Some(RequestId(3)), RejectKind::UnknownTenant)));
    assert!(kinds.contains(&(Some(RequestId(4)), RejectKind::PromptTooLong)));
    for id in [3, 4] {
        assert_eq!(seen.finished[&RequestId(id)].reason, FinishReason::Error);
    }
    assert_eq!(seen.finished[&RequestId(5)].reason, FinishReason::Length);

    // A quota too small for the prompt (7 blocks), for a tenant with no quota yet.
    let mut s = submit(6, "hooli", prompt(100), 2);
    if let ProxyToWorker::Submit(s) = &mut s {
        s.kv_block_quota = 2;
    }
    link.send(&s).unwrap();
    collect(&mut link, &[6], &mut seen);
    let refusal = seen
        .rejected
        .iter()
        .find(|r| r.request_id == Some(RequestId(6)))
        .unwrap();
    assert_eq!(refusal.kind, RejectKind::QuotaExhausted);
    assert!(
        refusal.detail.contains("needs 7 KV blocks"),
        "{}",
        refusal.detail
    );
    assert_eq!(seen.finished[&RequestId(6)].reason, FinishReason::Error);
    drop(link);

    // The worker is still up and serves a new connection.
    let mut link = worker.link();
    let mut s = submit(7, "globex", prompt(100), 2);
    if let ProxyToWorker::Submit(s) = &mut s {
        s.kv_block_quota = 2;
    }
    link.send(&s).unwrap();
    let mut seen = Seen::default();
    collect(&mut link, &[7], &mut seen);
    // globex's quota is 64 from request 2 (kept across connections), so it fits.
    assert_eq!(seen.finished[&RequestId(7)].reason, FinishReason::Length);
    link.send(&ProxyToWorker::Shutdown).unwrap();
    match recv_skipping_capacity(&mut link) {
        Err(LinkError::WorkerGone { .. }) => {}
        other => panic!("expected the worker to close after Shutdown, got {other:?}"),
    }
    // And the process exits by itself, cleanly.
    let deadline = Instant::now() + WAIT;
    let mut worker = worker;
    loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not exit after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_broken_stream_is_refused_and_the_worker_stays_up() {
    let worker = Worker::start("broken", &["--backend", "sim", "--sim-fast"]);
    let mut link = worker.link();
    // A length over the 16 MiB limit: the stream can't be trusted past it.
    link.send_raw(&[0xff, 0xff, 0xff, 0xff, 0x01, 0x01])
        .unwrap();
    match recv_skipping_capacity(&mut link) {
        Ok(WorkerToProxy::Rejected(r)) => {
            assert_eq!(r.kind, RejectKind::MalformedFrame);
            assert!(r.detail.contains("exceeds the limit"), "{}", r.detail);
        }
        other => panic!("expected a typed refusal, got {other:?}"),
    }
    assert!(matches!(
        recv_skipping_capacity(&mut link),
        Err(LinkError::WorkerGone { .. })
    ));
    // The process is still there and serves the next proxy.
    let mut link = worker.link();
    link.send(&submit(1, "acme", prompt(20), 4)).unwrap();
    let mut seen = Seen::default();
    collect(&mut link, &[1], &mut seen);
    assert_eq!(seen.tokens[&RequestId(1)].len(), 4);
}

#[test]
fn a_worker_that_dies_is_an_error_at_once_not_a_hang() {
    let mut worker = Worker::start("dies", &["--backend", "sim"]);
    let mut link = worker.link();
    // Long enough to be running when the worker dies (the sim paces in real time).
    link.send(&submit(1, "acme", prompt(20), 100_000)).unwrap();
    let _ = link.recv_timeout(WAIT).unwrap();
    worker.child.kill().unwrap();
    let started = Instant::now();
    let err = loop {
        match link.recv_timeout(WAIT) {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, LinkError::WorkerGone { worker_id: 3, .. }),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("went away"));
}

#[test]
fn a_proxy_that_goes_away_has_its_requests_cancelled() {
    let worker = Worker::start("orphans", &["--backend", "sim", "--slots", "2"]);
    let mut link = worker.link();
    link.send(&submit(1, "acme", prompt(40), 100_000)).unwrap();
    link.send(&submit(2, "acme", prompt(40), 100_000)).unwrap();
    let _ = link.recv_timeout(WAIT).unwrap();
    drop(link);
    // A new proxy sees every slot and block free again.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut link = worker.link();
        if let Ok(WorkerToProxy::Capacity(c)) = link.recv_timeout(Duration::from_secs(5))
            && c.free_slots == 2
            && c.free_blocks == 256 - c.per_tenant.iter().map(|t| t.used_blocks).sum::<u32>()
            && c.per_tenant.iter().all(|t| t.used_blocks <= 2)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the orphaned requests kept their slots"
        );
    }
}
