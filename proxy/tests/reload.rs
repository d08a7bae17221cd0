//! Hot reload of a running `bulkhead serve` (real processes, loopback):
//! SIGHUP and `bulkhead reload` apply new tenants, keys and limits to new
//! requests while an open h2 connection and a stream in flight carry on;
//! a reload that needs a restart, or a broken file, changes nothing.

use bulkhead_core::identity::ApiKeyHash;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");

struct Host {
    dir: PathBuf,
    serve: Child,
    tcp: String,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The host config: `tenants` is the `[[tenants]]` part, `pool` the KV pool size.
fn config(dir: &Path, tenants: &str, pool: u32) -> String {
    format!(
        r#"
trust_domain = "bulkhead.test"
[listeners]
quic = "127.0.0.1:0"
tcp = "127.0.0.1:0"
admin = "{admin}"
[tls]
cert = "{pki}/server.pem"
key = "{pki}/server.key"
client_ca = ["{pki}/tenant-ca.pem"]
[kv]
pool_blocks = {pool}
# Loopback tests must not attach programs to the test runner's own cgroup.
[ebpf]
mode = "off"
[[models]]
name = "tiny"
backend = "cpu"
max_context_tokens = 2048
{tenants}
"#,
        admin = dir.join("admin.sock").display(),
        pki = dir.join("pki").display(),
    )
}

fn tenant(id: &str, key: &str, rps: f64) -> String {
    format!(
        "[[tenants]]\nid = \"{id}\"\nallowed_models = [\"tiny\"]\nkv_block_quota = 256\n\
         requests_per_second = {rps:?}\nrequest_burst = 50\napi_key_sha256 = [\"{}\"]\n",
        ApiKeyHash::of(key).to_hex()
    )
}

fn start(name: &str, tenants: &str) -> Host {
    let dir = std::env::temp_dir().join(format!("bh-reload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let status = Command::new(BIN)
        .args(["certs", "--trust-domain", "bulkhead.test"])
        .args(["--tenants", "acme,globex,initech", "--out"])
        .arg(dir.join("pki"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(dir.join("host.toml"), config(&dir, tenants, 1024)).unwrap();
    let mut serve = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.join("host.toml"))
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
    let tcp = line
        .trim()
        .split_once(" tcp=")
        .unwrap_or_else(|| panic!("unexpected first line from serve: {line:?}"))
        .1
        .to_owned();
    Host { dir, serve, tcp }
}

/// An h2 connection with `tenant`'s client certificate.
async fn connect(host: &Host, tenant: &str) -> SendRequest<Full<Bytes>> {
    try_connect(host, &host.dir.join("pki"), tenant)
        .await
        .expect("the handshake succeeds")
}

/// An h2 connection with `tenant`'s client certificate from the PKI in `client_pki`.
async fn try_connect(
    host: &Host,
    client_pki: &Path,
    tenant: &str,
) -> Result<SendRequest<Full<Bytes>>, hyper::Error> {
    let pki = host.dir.join("pki");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.join("server-ca.pem")).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![
            CertificateDer::from_pem_file(client_pki.join(format!("client-{tenant}.pem"))).unwrap(),
        ],
        PrivateKeyDer::from_pem_file(client_pki.join(format!("client-{tenant}.key"))).unwrap(),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(&host.tcp).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the client's side of the handshake completes");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    // TLS 1.3 servers refuse a client certificate after the client's side of
    // the handshake is done: the refusal shows on the first exchange.
    send.ready().await?;
    let r = send
        .send_request(request("GET", "/healthz", "-", None))
        .await?;
    let _ = r.into_body().collect().await;
    Ok(send)
}

fn request(method: &str, path: &str, key: &str, body: Option<&Value>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(
            body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
        ))
        .unwrap()
}

/// The status of `GET /v1/models` with `key` on `conn`.
async fn models(conn: &mut SendRequest<Full<Bytes>>, key: &str) -> StatusCode {
    conn.ready().await.expect("the connection stays open");
    let r = conn
        .send_request(request("GET", "/v1/models", key, None))
        .await
        .unwrap();
    let status = r.status();
    let _ = r.into_body().collect().await;
    status
}

fn reload(host: &Host) -> std::process::Output {
    Command::new(BIN)
        .args(["reload", "--config"])
        .arg(host.dir.join("host.toml"))
        .output()
        .unwrap()
}

fn sighup(host: &Host) {
    let status = Command::new("kill")
        .args(["-HUP", &host.serve.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn rewrite(host: &Host, tenants: &str, pool: u32) {
    std::fs::write(host.dir.join("host.toml"), config(&host.dir, tenants, pool)).unwrap();
}

/// Polls `check` until it holds (a SIGHUP reload has no answer to wait for).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_tenants_and_keys_without_dropping_connections() {
    let host = start(
        "apply",
        &(tenant("acme", "sk-acme-1", 100.0) + &tenant("globex", "sk-globex", 100.0)),
    );
    let mut acme = connect(&host, "acme").await;
    let mut globex = connect(&host, "globex").await;
    let mut initech = connect(&host, "initech").await;
    assert_eq!(models(&mut acme, "sk-acme-1").await, StatusCode::OK);
    assert_eq!(models(&mut globex, "sk-globex").await, StatusCode::OK);
    // initech's certificate is valid, but it is no tenant of this host yet.
    assert_eq!(
        models(&mut initech, "sk-initech").await,
        StatusCode::UNAUTHORIZED
    );

    // A stream in flight on acme's connection when the config changes.
    acme.ready().await.unwrap();
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                      "max_tokens": 400, "stream": true, "seed": 7});
    let stream = acme
        .send_request(request(
            "POST",
            "/v1/chat/completions",
            "sk-acme-1",
            Some(&chat),
        ))
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);

    // acme's key is rotated, globex leaves, initech arrives: by SIGHUP.
    rewrite(
        &host,
        &(tenant("acme", "sk-acme-2", 100.0) + &tenant("initech", "sk-initech", 100.0)),
        1024,
    );
    sighup(&host);
    eventually("initech admitted after SIGHUP", async || {
        models(&mut initech, "sk-initech").await == StatusCode::OK
    })
    .await;
    // Same connections as before the reload.
    assert_eq!(models(&mut acme, "sk-acme-2").await, StatusCode::OK);
    assert_eq!(
        models(&mut acme, "sk-acme-1").await,
        StatusCode::UNAUTHORIZED,
        "the rotated-out key is refused"
    );
    assert_eq!(
        models(&mut globex, "sk-globex").await,
        StatusCode::UNAUTHORIZED,
        "a removed tenant is refused"
    );
    // The stream admitted before the reload ran to its end.
    let body = stream.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    new_limits_apply_and_refused_reloads_change_nothing(&host, &mut acme, &mut initech).await;
}

/// `bulkhead reload` applies a limit change; a reload needing a restart and a
/// broken file are refused whole.
async fn new_limits_apply_and_refused_reloads_change_nothing(
    host: &Host,
    acme: &mut SendRequest<Full<Bytes>>,
    initech: &mut SendRequest<Full<Bytes>>,
) {
    // `bulkhead reload`: acme's rate drops to a burst of 1 (a limit change).
    let one_rps =
        tenant("acme", "sk-acme-2", 0.1).replace("request_burst = 50", "request_burst = 1");
    rewrite(
        host,
        &(one_rps + &tenant("initech", "sk-initech", 100.0)),
        1024,
    );
    let out = reload(host);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tenants"]["changed"], json!(["acme"]), "{report}");
    acme.ready().await.unwrap();
    let completion = json!({"model": "tiny", "prompt": "hi", "max_tokens": 2});
    let mut statuses = Vec::new();
    for _ in 0..3 {
        acme.ready().await.unwrap();
        let r = acme
            .send_request(request(
                "POST",
                "/v1/completions",
                "sk-acme-2",
                Some(&completion),
            ))
            .await
            .unwrap();
        statuses.push(r.status());
        let _ = r.into_body().collect().await;
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "the new limit applies: {statuses:?}"
    );

    // A change that needs a restart is refused whole and names itself...
    rewrite(host, &tenant("initech", "sk-initech", 100.0), 2048);
    let out = reload(host);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[kv] changed"), "{err}");
    // ... and so is a broken file; neither changed anything (acme is still there).
    std::fs::write(host.dir.join("host.toml"), "trust_domain = 7").unwrap();
    let out = Command::new(BIN)
        .args(["reload", "--admin"])
        .arg(host.dir.join("admin.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config has errors") && err.contains("trust_domain"),
        "{err}"
    );
    sighup(host); // logged and refused; the process carries on
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(models(initech, "sk-initech").await, StatusCode::OK);
    assert_ne!(
        models(acme, "sk-acme-2").await,
        StatusCode::UNAUTHORIZED,
        "acme is still a tenant"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_takes_a_new_client_ca_for_new_connections() {
    let host = start("tls", &tenant("acme", "sk-acme", 100.0));
    // A second tenant CA, not trusted yet, issues acme a certificate.
    let other = host.dir.join("pki2");
    let status = Command::new(BIN)
        .args([
            "certs",
            "--trust-domain",
            "bulkhead.test",
            "--tenants",
            "acme",
            "--out",
        ])
        .arg(&other)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        try_connect(&host, &other, "acme").await.is_err(),
        "a CA the config does not name is refused"
    );
    let mut before = connect(&host, "acme").await;
    let trusting_both = config(&host.dir, &tenant("acme", "sk-acme", 100.0), 1024).replace(
        "client_ca = [",
        &format!(
            "client_ca = [\"{}\", ",
            other.join("tenant-ca.pem").display()
        ),
    );
    std::fs::write(host.dir.join("host.toml"), trusting_both).unwrap();
    let out = reload(&host);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut after = try_connect(&host, &other, "acme")
        .await
        .expect("the new CA is trusted after the reload");
    assert_eq!(models(&mut after, "sk-acme").await, StatusCode::OK);
    assert_eq!(
        models(&mut before, "sk-acme").await,
        StatusCode::OK,
        "a connection from before the reload carries on"
    );
    // A TLS file that does not parse is refused, and the TLS in use stays.
    std::fs::write(other.join("tenant-ca.pem"), "not a certificate").unwrap();
    let out = reload(&host);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS"), "{err}");
    assert!(try_connect(&host, &other, "acme").await.is_ok());
}
