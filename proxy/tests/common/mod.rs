//! A `bulkhead serve` process for end-to-end tests (loopback, CPU worker,
//! kernel enforcement off, an admin socket), and an h2 client with a
//! tenant's certificate.

#![allow(dead_code, reason = "each test file uses a part")]

use bulkhead_core::identity::ApiKeyHash;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");

pub struct Host {
    pub dir: PathBuf,
    pub serve: Child,
    /// The QUIC (HTTP/3) listener's address.
    pub quic: String,
    pub tcp: String,
    /// The metrics endpoint's address (`[listeners] metrics`).
    pub metrics: String,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The host config: `tenants` is the `[[tenants]]` part, `pool` the KV pool size.
pub fn config(dir: &Path, tenants: &str, pool: u32) -> String {
    format!(
        r#"
trust_domain = "bulkhead.test"
[listeners]
quic = "127.0.0.1:0"
tcp = "127.0.0.1:0"
admin = "{admin}"
metrics = "127.0.0.1:0"
[tls]
cert = "{pki}/server.pem"
key = "{pki}/server.key"
client_ca = ["{pki}/tenant-ca.pem"]
[kv]
pool_blocks = {pool}
# Loopback tests must not attach programs to the test runner's own cgroup.
[ebpf]
mode = "off"
[audit]
dir = "{audit}"
key_file = "{key}"
[[models]]
name = "tiny"
backend = "cpu"
max_context_tokens = 2048
{tenants}
"#,
        admin = dir.join("admin.sock").display(),
        audit = dir.join("audit").display(),
        key = dir.join("audit.key").display(),
        pki = dir.join("pki").display(),
    )
}

pub fn tenant(id: &str, key: &str, rps: f64) -> String {
    format!(
        "[[tenants]]\nid = \"{id}\"\nallowed_models = [\"tiny\"]\nkv_block_quota = 256\n\
         requests_per_second = {rps:?}\nrequest_burst = 50\napi_key_sha256 = [\"{}\"]\n",
        ApiKeyHash::of(key).to_hex()
    )
}

pub fn start(name: &str, tenants: &str) -> Host {
    start_backend(name, tenants, "cpu")
}

/// [`start`] with the model on `backend` (`cpu` or `sim`).
pub fn start_backend(name: &str, tenants: &str, backend: &str) -> Host {
    start_with(name, tenants, &|text| {
        text.replace("backend = \"cpu\"", &format!("backend = \"{backend}\""))
    })
}

/// The scratch directory of a host named `name`, empty.
pub fn host_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bh-host-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// [`start`] with the config text `edit` makes of the default's.
pub fn start_with(name: &str, tenants: &str, edit: &dyn Fn(String) -> String) -> Host {
    start_in(host_dir(name), tenants, edit)
}

/// [`start_with`] in `dir` (from [`host_dir`], where a test may have put files).
pub fn start_in(dir: PathBuf, tenants: &str, edit: &dyn Fn(String) -> String) -> Host {
    let status = Command::new(BIN)
        .args(["certs", "--trust-domain", "bulkhead.test"])
        .args(["--tenants", "acme,globex,initech", "--out"])
        .arg(dir.join("pki"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = edit(config(&dir, tenants, 1024));
    std::fs::write(dir.join("host.toml"), text).unwrap();
    let mut serve = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.join("host.toml"))
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in the first line from serve: {line:?}"))
            .to_owned()
    };
    let (quic, tcp, metrics) = (field("quic="), field("tcp="), field("metrics="));
    Host {
        dir,
        serve,
        quic,
        tcp,
        metrics,
    }
}

/// An h2 connection with `tenant`'s client certificate.
pub async fn connect(host: &Host, tenant: &str) -> SendRequest<Full<Bytes>> {
    try_connect(host, &host.dir.join("pki"), tenant)
        .await
        .expect("the handshake succeeds")
}

/// An h2 connection with `tenant`'s client certificate from the PKI in `client_pki`.
pub async fn try_connect(
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

pub fn request(method: &str, path: &str, key: &str, body: Option<&Value>) -> Request<Full<Bytes>> {
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

/// `GET path` on the host's admin socket, as JSON.
pub fn admin_get(host: &Host, path: &str) -> Value {
    let body = admin_get_text(host, path);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// `GET path` on the host's admin socket: the body.
pub fn admin_get_text(host: &Host, path: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(host.dir.join("admin.sock")).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n")
        .expect("an HTTP answer")
        .1
        .to_owned()
}
