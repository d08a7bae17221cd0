//! The audit writer on real files: group commit and acknowledgement,
//! rotation, retention, torn-tail recovery, a writer killed with SIGKILL
//! under load, the live tail, and the `audit` commands' exit codes.

use bulkhead::audit::{
    AuditWriter, CommitObserver, Committed, SubmitError, TailServer, WriterConfig, os_random,
};
use bulkhead_core::TenantId;
use bulkhead_core::audit::{
    AuditEvent, ConnectionRefused, ContentDigest, EventKind, Failure, MasterKey, OpenedRecord,
    PartitionId, RequestEvent, open_partition, parse_segment_file_name, valid_prefix_len,
    verify_partition,
};
use bulkhead_core::wire::RequestId;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");

/// A fresh directory under the temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let mut r = [0; 8];
        os_random(&mut r);
        let dir = std::env::temp_dir().join(format!(
            "bh-audit-{name}-{}-{}",
            std::process::id(),
            hex(&r)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn master() -> MasterKey {
    MasterKey::from_bytes([0x11; 32])
}

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

fn request(t: &str, i: u64) -> AuditEvent {
    AuditEvent {
        time_unix_ns: 1_700_000_000_000_000_000 + i,
        kind: EventKind::Request(RequestEvent {
            request_id: RequestId(u128::from(i) + 1),
            tenant: tenant(t),
            model: "tiny".into(),
            prompt_digest: ContentDigest([3; 32]),
            response_digest: ContentDigest([4; 32]),
            input_tokens: 5,
            output_tokens: 6,
            ttft_us: Some(700),
            latency_us: 9_000,
            worker: Some(1),
            rerouted: false,
            cache_hit: false,
            status: 200,
            error_code: None,
            source: None,
            api_key_prefix: None,
        }),
    }
}

fn segments(dir: &Path, partition: &str) -> Vec<(u32, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir.join(partition))
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let n = parse_segment_file_name(e.file_name().to_str()?)?;
            Some((n, std::fs::read(e.path()).unwrap()))
        })
        .collect();
    out.sort_by_key(|s| s.0);
    out
}

fn open(dir: &Path, partition: &str, key: &MasterKey) -> Vec<OpenedRecord> {
    let p = PartitionId::parse(partition).unwrap();
    let segs = segments(dir, partition);
    let view: Vec<_> = segs.iter().map(|(n, b)| (*n, &b[..])).collect();
    open_partition(&p, &view, &key.tenant_key(&p), &mut |_| true)
        .unwrap_or_else(|bad| panic!("{bad}"))
}

fn requests_of(records: &[OpenedRecord]) -> Vec<AuditEvent> {
    records
        .iter()
        .filter(|r| matches!(r.event.kind, EventKind::Request(_)))
        .map(|r| r.event.clone())
        .collect()
}

#[test]
fn group_commit_acknowledges_only_durable_records_and_keeps_order_per_tenant() {
    let tmp = TempDir::new("commit");
    let writer = AuditWriter::start(master(), WriterConfig::new(&tmp.0), Vec::new()).unwrap();
    let sink = writer.sink();
    let mut last = None;
    for i in 0..600 {
        let t = ["a", "b", "c"][usize::try_from(i % 3).unwrap()];
        last = Some(sink.submit(request(t, i), Duration::from_secs(5)).unwrap());
    }
    let host = AuditEvent {
        time_unix_ns: 1,
        kind: EventKind::ConnectionRefused(ConnectionRefused {
            tenant: None,
            source: Some("192.0.2.7:999".parse().unwrap()),
            reason: "client certificate from an unknown CA".into(),
        }),
    };
    let host_ticket = sink.submit(host.clone(), Duration::from_secs(5)).unwrap();
    assert!(host_ticket > last.unwrap());
    sink.wait_durable(host_ticket, Duration::from_secs(20))
        .unwrap();
    let c = sink.counters();
    assert_eq!((c.submitted, c.written, c.full_refusals), (601, 601, 0));
    assert!(c.groups >= 1 && c.durable_through == host_ticket.0);
    // Durable means on disk now, before shutdown.
    for t in ["a", "b", "c"] {
        let expected: Vec<_> = (0..600)
            .filter(|i| ["a", "b", "c"][usize::try_from(i % 3).unwrap()] == t)
            .map(|i| request(t, i))
            .collect();
        assert_eq!(requests_of(&open(&tmp.0, t, &master())), expected);
    }
    assert_eq!(open(&tmp.0, "_host", &master())[0].event, host);
    writer.shutdown().unwrap();
    assert_eq!(
        sink.submit(request("a", 0), Duration::ZERO),
        Err(SubmitError::Closed)
    );
}

#[test]
fn segments_rotate_by_size_and_the_chain_spans_them() {
    let tmp = TempDir::new("rotate");
    let mut config = WriterConfig::new(&tmp.0);
    config.segment_max_bytes = 2_000;
    config.max_batch = 4;
    let writer = AuditWriter::start(master(), config, Vec::new()).unwrap();
    let sink = writer.sink();
    for i in 0..100 {
        let t = sink
            .submit(request("a", i), Duration::from_secs(5))
            .unwrap();
        sink.wait_durable(t, Duration::from_secs(20)).unwrap();
    }
    writer.shutdown().unwrap();
    let segs = segments(&tmp.0, "a");
    assert!(segs.len() >= 5, "only {} segments", segs.len());
    for (_, b) in &segs[..segs.len() - 1] {
        assert!(b.len() < 2_000 + 4 * 300, "segment of {} bytes", b.len());
    }
    let records = open(&tmp.0, "a", &master());
    assert_eq!(
        requests_of(&records),
        (0..100).map(|i| request("a", i)).collect::<Vec<_>>()
    );
    assert_eq!(records.last().unwrap().seq, 100);
}

#[test]
fn retention_removes_the_oldest_segments_but_never_the_newest() {
    let tmp = TempDir::new("retain");
    let mut config = WriterConfig::new(&tmp.0);
    config.segment_max_bytes = 1_500;
    config.max_batch = 2;
    config.retention_max_bytes = Some(5_000);
    let writer = AuditWriter::start(master(), config, Vec::new()).unwrap();
    let sink = writer.sink();
    for i in 0..120 {
        let t = sink
            .submit(request("a", i), Duration::from_secs(5))
            .unwrap();
        sink.wait_durable(t, Duration::from_secs(20)).unwrap();
    }
    writer.shutdown().unwrap();
    let segs = segments(&tmp.0, "a");
    let total: usize = segs.iter().map(|s| s.1.len()).sum();
    assert!(total <= 5_000 + 1_500 + 600, "{total} bytes kept");
    assert!(segs[0].0 > 1, "the oldest segment should be gone");
    let p = PartitionId::parse("a").unwrap();
    let view: Vec<_> = segs.iter().map(|(n, b)| (*n, &b[..])).collect();
    let report = verify_partition(&p, &view, Some(&master().tenant_key(&p)));
    assert_eq!(report.first_bad, None);
    assert!(report.base_seq.unwrap() > 0);
    assert_eq!(report.last_seq, 120);

    // By age: with a zero age limit every closed segment goes, the newest stays.
    let mut config = WriterConfig::new(&tmp.0);
    config.segment_max_bytes = 1_500;
    config.retention_max_age = Some(Duration::ZERO);
    let writer = AuditWriter::start(master(), config, Vec::new()).unwrap();
    let sink = writer.sink();
    for i in 120..140 {
        let t = sink
            .submit(request("a", i), Duration::from_secs(5))
            .unwrap();
        sink.wait_durable(t, Duration::from_secs(20)).unwrap();
    }
    writer.shutdown().unwrap();
    let segs = segments(&tmp.0, "a");
    assert!(segs.len() <= 2, "{} segments kept", segs.len());
    let view: Vec<_> = segs.iter().map(|(n, b)| (*n, &b[..])).collect();
    let report = verify_partition(&p, &view, None);
    assert_eq!(report.first_bad, None);
    assert_eq!(report.last_seq, 140);
}

#[test]
fn a_torn_tail_is_cut_recorded_and_the_chain_continues() {
    let tmp = TempDir::new("torn");
    let writer = AuditWriter::start(master(), WriterConfig::new(&tmp.0), Vec::new()).unwrap();
    let sink = writer.sink();
    for i in 0..10 {
        sink.submit(request("a", i), Duration::from_secs(5))
            .unwrap();
    }
    writer.shutdown().unwrap();
    // A crash mid-write: the last record only partly on disk.
    let path = tmp.0.join("a").join("0000000000000001.seg");
    let whole = std::fs::read(&path).unwrap();
    let torn_len = whole.len() - 30;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(torn_len as u64)
        .unwrap();
    let p = PartitionId::parse("a").unwrap();
    let valid = valid_prefix_len(&p, 1, &whole[..torn_len]);
    assert!(valid < torn_len && torn_len - valid < 300);
    let bad = verify_partition(&p, &[(1, &whole[..torn_len])], None)
        .first_bad
        .unwrap();
    assert_eq!(
        bad.failure,
        Failure::TornTail {
            bytes: (torn_len - valid) as u64
        },
        "{bad}"
    );

    // The wrong master key is refused before anything is written.
    let wrong = MasterKey::from_bytes([0x22; 32]);
    let err = AuditWriter::start(wrong, WriterConfig::new(&tmp.0), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("wrong master key"), "{err}");

    let writer = AuditWriter::start(master(), WriterConfig::new(&tmp.0), Vec::new()).unwrap();
    let sink = writer.sink();
    for i in 10..15 {
        sink.submit(request("a", i), Duration::from_secs(5))
            .unwrap();
    }
    writer.shutdown().unwrap();
    let records = open(&tmp.0, "a", &master());
    let expected: Vec<_> = (0..15)
        .filter(|i| *i != 9)
        .map(|i| request("a", i))
        .collect();
    assert_eq!(requests_of(&records), expected);
    let recovered: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.event.kind {
            EventKind::Recovered(rec) => Some((r.seq, r.segment, rec.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(recovered.len(), 1);
    let (seq, segment, rec) = &recovered[0];
    assert_eq!((*seq, *segment), (10, 2));
    assert_eq!(rec.segment, 1);
    assert_eq!(
        (rec.cut_bytes, rec.damaged_bytes),
        ((torn_len - valid) as u64, 0)
    );
    assert_eq!(std::fs::read(&path).unwrap().len(), valid);
}

/// Collects what a writer reports durable.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, u64)>>>);

impl CommitObserver for Seen {
    fn committed(&mut self, records: &[Committed<'_>]) {
        let mut v = self.0.lock().unwrap();
        v.extend(records.iter().map(|r| (r.partition.to_string(), r.seq)));
    }
}

#[test]
fn the_tail_streams_durable_records_and_drops_a_client_that_does_not_read() {
    let tmp = TempDir::new("tail");
    let socket = tmp.0.join("tail.sock");
    let (server, observer) = TailServer::bind(&socket).unwrap();
    let seen = Seen::default();
    let writer = AuditWriter::start(
        master(),
        WriterConfig::new(tmp.0.join("log")),
        vec![Box::new(observer), Box::new(seen.clone())],
    )
    .unwrap();
    let sink = writer.sink();
    let mut reader = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    reader.write_all(b"b\n").unwrap();
    let mut stalled = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stalled.write_all(b"*\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.clients() < 2 {
        assert!(Instant::now() < deadline, "tail clients never registered");
        std::thread::sleep(Duration::from_millis(10));
    }
    for i in 0..4 {
        let t = sink
            .submit(
                request(if i % 2 == 0 { "a" } else { "b" }, i),
                Duration::from_secs(5),
            )
            .unwrap();
        sink.wait_durable(t, Duration::from_secs(20)).unwrap();
    }
    let mut lines = BufReader::new(reader.try_clone().unwrap()).lines();
    for expected_seq in [1, 2] {
        let line: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(line["partition"], "b");
        assert_eq!(line["seq"], expected_seq);
        assert_eq!(line["type"], "request");
    }
    // The stalled client never reads: the writer goes on without it.
    let start = Instant::now();
    let mut last = None;
    for i in 0..20_000 {
        last = Some(
            sink.submit(request("a", i), Duration::from_secs(5))
                .unwrap(),
        );
    }
    sink.wait_durable(last.unwrap(), Duration::from_mins(1))
        .unwrap();
    assert!(server.dropped_clients() >= 1, "the stalled client was kept");
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(seen.0.lock().unwrap().len(), 20_004);
    writer.shutdown().unwrap();
    drop(stalled);
    drop(server);
    assert!(!socket.exists());
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The crash test: `audit load` killed with SIGKILL at random points,
/// restarted each time; every acknowledged record must be there, and every
/// chain must verify.
#[test]
fn a_writer_killed_under_load_loses_no_acknowledged_record() {
    let tmp = TempDir::new("crash");
    let key = tmp.0.join("master.key");
    let out = run(&["audit", "keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = tmp.0.join("log");
    let dir_s = dir.to_str().unwrap();
    let mut acked: BTreeMap<(String, u64), String> = BTreeMap::new();
    for round in 0..5 {
        let mut child = Command::new(BIN)
            .args([
                "audit",
                "load",
                "--dir",
                dir_s,
                "--key",
                key.to_str().unwrap(),
                "--records",
                "100000000",
                "--tenants",
                "a,b,c",
                "--rate",
                "30000",
                "--segment-bytes",
                "200000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.is_empty() {
                    let _ = first_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        // Killed at a random point once it is writing (its start-up, with
        // recovery of the partitions, takes longer on a loaded machine).
        first_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("round {round}: nothing acknowledged in 30 s"));
        let mut r = [0; 2];
        os_random(&mut r);
        let wait = 50 + u64::from(u16::from_le_bytes(r)) % 350;
        std::thread::sleep(Duration::from_millis(wait));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let before = acked.len();
        for line in lines {
            // A line cut by the kill is not an acknowledgement.
            let parts: Vec<_> = line.split(' ').collect();
            if let ["ack", t, seq, id] = parts[..]
                && id.len() == 32
            {
                let previous = acked.insert((t.to_owned(), seq.parse().unwrap()), id.to_owned());
                assert!(previous.is_none(), "seq {seq} of {t} acknowledged twice");
            }
        }
        assert!(
            acked.len() > before,
            "round {round}: nothing acknowledged before the kill"
        );
    }
    let master = bulkhead::audit::read_master_key(&key).unwrap();
    for t in ["a", "b", "c"] {
        let records = open(&dir, t, &master);
        let by_seq: HashMap<u64, &AuditEvent> = records.iter().map(|r| (r.seq, &r.event)).collect();
        for ((tt, seq), id) in acked.range((t.to_owned(), 0)..=(t.to_owned(), u64::MAX)) {
            assert_eq!(tt, t);
            match by_seq.get(seq).map(|e| &e.kind) {
                Some(EventKind::Request(q)) => assert_eq!(&q.request_id.to_string(), id),
                other => panic!("acknowledged {t} seq {seq} missing: {other:?}"),
            }
        }
    }
    let out = run(&[
        "audit",
        "verify",
        "--dir",
        dir_s,
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).matches("ok    tenant").count(), 3);
}

/// A small log written by the CLI, for the command tests.
fn cli_log(tmp: &TempDir) -> (PathBuf, String) {
    let key = tmp.0.join("master.key");
    let dir = tmp.0.join("log");
    assert!(
        run(&["audit", "keygen", "--out", key.to_str().unwrap()])
            .status
            .success()
    );
    let again = run(&["audit", "keygen", "--out", key.to_str().unwrap()]);
    assert!(
        !again.status.success(),
        "keygen replaced a key without --force"
    );
    let out = run(&[
        "audit",
        "load",
        "--dir",
        dir.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--records",
        "300",
        "--tenants",
        "acme,beta",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 300);
    (key, dir.to_str().unwrap().to_owned())
}

#[test]
fn verify_query_and_report_succeed_on_an_intact_log() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = TempDir::new("cli");
    let (key, dir) = cli_log(&tmp);
    let key_s = key.to_str().unwrap();
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let out = run(&["audit", "verify", "--dir", &dir]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let out = run(&[
        "audit", "query", "--dir", &dir, "--key", key_s, "--tenant", "acme",
    ]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 150);
    assert!(lines.iter().all(|l| l["tenant"] == "acme"));
    let out = run(&[
        "audit",
        "query",
        "--dir",
        &dir,
        "--key",
        key_s,
        "--tenant",
        "acme",
        "--until",
        "1970-01-02",
    ]);
    assert!(out.status.success() && out.stdout.is_empty());
    let out = run(&[
        "audit", "report", "--dir", &dir, "--key", key_s, "--tenant", "acme", "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["requests"], 150);
    assert_eq!(report["failed"], 6); // every 50th synthetic request is refused, all acme's
    assert_eq!(report["distinct_api_keys"], 7);
    assert!(
        report["latency_ms"]["p99"].as_f64().unwrap()
            >= report["latency_ms"]["p50"].as_f64().unwrap()
    );
    let out = run(&[
        "audit", "report", "--dir", &dir, "--key", key_s, "--tenant", "acme",
    ]);
    assert!(
        text(&out.stdout).contains("success rate      96.00%"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_wrong_or_missing_key_is_a_clear_error_with_no_plaintext() {
    let tmp = TempDir::new("keys");
    let (key, dir) = cli_log(&tmp);
    let key_s = key.to_str().unwrap();

    // A tenant-scoped key reads its tenant only.
    let beta_key = tmp.0.join("beta.key");
    let out = run(&[
        "audit",
        "export-key",
        "--master-key",
        key_s,
        "--tenant",
        "beta",
        "--out",
        beta_key.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let beta_s = beta_key.to_str().unwrap();
    let out = run(&[
        "audit", "query", "--dir", &dir, "--key", beta_s, "--tenant", "beta",
    ]);
    assert_eq!(text(&out.stdout).lines().count(), 150);
    let out = run(&[
        "audit", "query", "--dir", &dir, "--key", beta_s, "--tenant", "acme",
    ]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("cannot read tenant acme"),
        "{}",
        text(&out.stderr)
    );

    // Wrong, missing and malformed keys: a clear error, no plaintext.
    let wrong = tmp.0.join("wrong.key");
    assert!(
        run(&["audit", "keygen", "--out", wrong.to_str().unwrap()])
            .status
            .success()
    );
    let out = run(&[
        "audit",
        "query",
        "--dir",
        &dir,
        "--key",
        wrong.to_str().unwrap(),
        "--tenant",
        "acme",
    ]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("sealed under key id"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&[
        "audit",
        "query",
        "--dir",
        &dir,
        "--key",
        "/nonexistent/key",
        "--tenant",
        "acme",
    ]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(text(&out.stderr).contains("reading the key file /nonexistent/key"));
    let out = run(&["audit", "query", "--dir", &dir, "--tenant", "acme"]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(text(&out.stderr).contains("--key"));
    let junk = tmp.0.join("junk.key");
    std::fs::write(&junk, "secret-looking junk that is no key\n").unwrap();
    let out = run(&[
        "audit",
        "query",
        "--dir",
        &dir,
        "--key",
        junk.to_str().unwrap(),
        "--tenant",
        "acme",
    ]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(text(&out.stderr).contains("not an audit key"));
    assert!(
        !text(&out.stderr).contains("secret-looking"),
        "key content echoed"
    );
    let out = run(&[
        "audit",
        "verify",
        "--dir",
        &dir,
        "--key",
        wrong.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
}

#[test]
fn a_flipped_byte_fails_verify_at_its_position_and_query_prints_nothing() {
    let tmp = TempDir::new("flip");
    let (key, dir) = cli_log(&tmp);
    let key_s = key.to_str().unwrap();

    // One flipped byte: verify names tenant, segment, offset and failure;
    // query prints nothing of that tenant.
    let seg = Path::new(&dir).join("acme").join("0000000000000001.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = 168 + 16 + 5 + 3 * (bytes.len() - 168) / 150;
    bytes[at] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let out = run(&["audit", "verify", "--dir", &dir]);
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("BAD   tenant acme: segment 0000000000000001 at byte"),
        "{stdout}"
    );
    assert!(stdout.contains("ok    tenant beta"), "{stdout}");
    let out = run(&[
        "audit", "query", "--dir", &dir, "--key", key_s, "--tenant", "acme",
    ]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(text(&out.stderr).contains("nothing printed"));
}
