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
    identity::ApiKeyHash,
    wire::{ProxyToWorker, RequestId, Sampling, Submit, WorkerToProxy},
};
use bulkhead_kernels::model::{ByteTokenizer, ModelConfig};
use serde_json::{Value, json};
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

const ACME_KEY: &str = "sk-acme-e2e";
const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");

struct Host {
    dir: PathBuf,
    serve: Child,
    quic: String,
    tcp: String,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `cargo xtask setup` (it makes the venv with aioquic and openai)",
        py.display()
    );
    py
}

fn start(name: &str) -> Host {
    let dir = std::env::temp_dir().join(format!("bh-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pki = dir.join("pki");
    let status = Command::new(BIN)
        .args([
            "certs",
            "--trust-domain",
            "bulkhead.test",
            "--tenants",
            "acme,globex",
            "--out",
        ])
        .arg(&pki)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let config = format!(
        r#"
trust_domain = "bulkhead.test"
[listeners]
quic = "127.0.0.1:0"
tcp = "127.0.0.1:0"
[tls]
cert = "{pki}/server.pem"
key = "{pki}/server.key"
client_ca = ["{pki}/tenant-ca.pem"]
[kv]
pool_blocks = 1024
# Loopback tests must not attach programs to the test runner's own cgroup.
[ebpf]
mode = "off"
[audit]
dir = "{dir}/audit"
key_file = "{dir}/audit.key"
[[models]]
name = "tiny"
backend = "cpu"
max_context_tokens = 2048
[[tenants]]
id = "acme"
allowed_models = ["tiny"]
kv_block_quota = 512
api_key_sha256 = ["{key}"]
[[tenants]]
id = "globex"
allowed_models = ["tiny"]
kv_block_quota = 512
"#,
        pki = pki.display(),
        dir = dir.display(),
        key = ApiKeyHash::of(ACME_KEY).to_hex()
    );
    let config_path = dir.join("host.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut serve = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config_path)
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let (quic, tcp) = line
        .trim()
        .strip_prefix("listening quic=")
        .and_then(|rest| rest.split_once(" tcp="))
        .unwrap_or_else(|| panic!("unexpected first line from serve: {line:?}"));
    Host {
        quic: quic.to_owned(),
        tcp: tcp.to_owned(),
        serve,
        dir,
    }
}

fn port(addr: &str) -> &str {
    addr.rsplit_once(':').unwrap().1
}

/// The tokens a worker gives directly for this chat body.
fn direct_tokens(dir: &Path, body: &Value) -> String {
    let req = parse(Kind::Chat, body.to_string().as_bytes()).unwrap();
    let tokens = ByteTokenizer::new(&ModelConfig::tiny()).encode(&req.prompt);
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
    let host = start("stream");
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
    let host = start("refuse");
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
