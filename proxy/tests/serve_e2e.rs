//! `bulkhead serve` end to end, real processes on loopback: clients nobody
//! here wrote (Python aioquic over HTTP/3, the OpenAI Python SDK over
//! TLS/TCP) stream a chat completion with a tenant's certificate and see the
//! tokens a direct worker call gives for the same seed; the transport
//! refuses clients without a trusted certificate.

use bulkhead::{
    api::openai::{Kind, parse},
    worker::WorkerLink,
};
use bulkhead_core::{
    TenantId,
    wire::{ProxyToWorker, RequestId, Sampling, Submit, WorkerToProxy},
};
use bulkhead_kernels::model::{ByteTokenizer, ModelConfig};
use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

mod common;

use common::{Host, start, tenant};

const ACME_KEY: &str = "sk-acme-e2e";
const BIN: &str = common::BIN;

fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `cargo xtask setup` (it makes the venv with aioquic and openai)",
        py.display()
    );
    py
}

/// `serve` with acme (whose API key is [`ACME_KEY`]) and globex, a CPU worker.
fn host(name: &str) -> Host {
    start(
        &format!("e2e-{name}"),
        &(tenant("acme", ACME_KEY, 100.0) + &tenant("globex", "sk-globex-e2e", 100.0)),
    )
}

fn port(addr: &str) -> &str {
    addr.rsplit_once(':').unwrap().1
}

/// The tokens a worker gives directly for this chat body.
fn direct_tokens(dir: &Path, body: &Value) -> String {
    let req = parse(Kind::Chat, body.to_string().as_bytes()).unwrap();
    let tokens = ByteTokenizer::new(&ModelConfig::tiny()).encode(&req.prompt.render_builtin());
    let socket = dir.join("direct.sock");
    let mut worker = Command::new(BIN)
        .args([
            "worker",
            "--backend",
            "cpu",
            "--model-name",
            "tiny",
            "--listen",
        ])
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut link = WorkerLink::connect(&socket, 0, Duration::from_mins(1)).unwrap();
    link.send(&ProxyToWorker::Submit(Submit {
        request_id: RequestId(1),
        tenant: TenantId::new("acme").unwrap(),
        model: "tiny".to_owned(),
        prompt_tokens: tokens,
        max_tokens: req.max_tokens.unwrap(),
        sampling: Sampling {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            stop: vec![],
        },
        kv_block_quota: 512,
    }))
    .unwrap();
    let mut out = Vec::new();
    loop {
        match link.recv_timeout(Duration::from_mins(1)).unwrap() {
            WorkerToProxy::Tokens { tokens, .. } => out.extend(tokens),
            WorkerToProxy::Finished(_) => break,
            _ => {}
        }
    }
    let _ = worker.kill();
    let _ = worker.wait();
    ByteTokenizer::new(&ModelConfig::tiny()).decode(&out)
}

fn h3(host: &Host, tenant_cert: &str, tenant_key: &str, body: &Value) -> Vec<Value> {
    let pki = host.dir.join("pki");
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/h3_client.py"))
        .arg("--url")
        .arg(format!(
            "https://localhost:{}/v1/chat/completions",
            port(&host.quic)
        ))
        .arg("--ca")
        .arg(pki.join("server-ca.pem"))
        .arg("--cert")
        .arg(pki.join(tenant_cert))
        .arg("--key")
        .arg(pki.join(tenant_key))
        .arg("--data")
        .arg(body.to_string())
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sse_text(lines: &[Value]) -> String {
    let mut text = String::new();
    for l in lines {
        if let Some(chunk) = l.get("chunk").and_then(Value::as_str) {
            for event in chunk.split("\n\n") {
                let Some(data) = event.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).unwrap();
                if let Some(c) = v["choices"].get(0) {
                    text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
                }
            }
        }
    }
    text
}

#[test]
fn h3_and_openai_sdk_stream_what_the_worker_gives() {
    let host = host("stream");
    let body = json!({
        "model": "tiny", "stream": true, "max_tokens": 16, "temperature": 0.7, "seed": 42,
        "messages": [{"role": "user", "content": "Tell me about isolation."}]
    });
    let expected = direct_tokens(&host.dir, &body);
    assert!(!expected.is_empty());

    let lines = h3(&host, "client-acme.pem", "client-acme.key", &body);
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    assert_eq!(lines.last().unwrap()["end"], true, "{lines:?}");
    assert_eq!(
        sse_text(&lines),
        expected,
        "HTTP/3 stream differs from the direct worker call"
    );

    let pki = host.dir.join("pki");
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/openai_client.py"))
        .arg("--base-url")
        .arg(format!("https://localhost:{}/v1", port(&host.tcp)))
        .arg("--ca")
        .arg(pki.join("server-ca.pem"))
        .arg("--cert")
        .arg(pki.join("client-acme.pem"))
        .arg("--key")
        .arg(pki.join("client-acme.key"))
        .args([
            "--api-key",
            ACME_KEY,
            "--model",
            "tiny",
            "--content",
            "Tell me about isolation.",
        ])
        .args([
            "--max-tokens",
            "16",
            "--temperature",
            "0.7",
            "--seed",
            "42",
            "--stream",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        v["text"], expected,
        "the OpenAI SDK over TLS/TCP saw other tokens"
    );
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 16);
}

#[test]
fn clients_without_a_trusted_certificate_are_refused() {
    let host = host("refuse");
    let body =
        json!({"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let lines = h3(&host, "untrusted-client.pem", "untrusted-client.key", &body);
    assert!(
        lines.last().unwrap().get("error").is_some(),
        "a client of another CA got in: {lines:?}"
    );
    let lines = h3(&host, "client-globex.pem", "client-globex.key", &body);
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
}
