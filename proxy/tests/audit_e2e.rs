//! The audit hand-off end to end (real processes, loopback): every
//! completion request of a tenant leaves one sealed record in its own
//! partition, with the id the client saw, keyed digests of what was sent
//! and answered (never the content), its tokens and status; refusals,
//! abandoned streams and refused connections are recorded too; the log
//! verifies, and a tenant's key reads its partition only.

mod common;

use bulkhead::audit::{AuditKeys, read_master_key};
use bulkhead_core::TenantId;
use common::{BIN, Host, connect, request, start, tenant};
use http::StatusCode;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    process::{Command, Output},
    time::Duration,
};

fn audit(args: &[&str]) -> Output {
    Command::new(BIN).arg("audit").args(args).output().unwrap()
}

fn path(host: &Host, name: &str) -> String {
    host.dir.join(name).display().to_string()
}

/// `audit query` of `tenant`'s records, by request id.
fn records(host: &Host, tenant: &str) -> Vec<Value> {
    let (dir, key) = (path(host, "audit"), path(host, "audit.key"));
    let out = audit(&["query", "--dir", &dir, "--key", &key, "--tenant", tenant]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What the clients sent and saw.
struct Driven {
    whole: Value,
    answer: Value,
    whole_id: String,
    whole_text: String,
    globex_text: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_leaves_one_sealed_record_of_its_tenant() {
    let mut host = start(
        "audit",
        &(tenant("acme", "sk-acme", 100.0) + &tenant("globex", "sk-globex", 100.0)),
    );
    let driven = drive(&host).await;
    // Stop: the listeners drain and the writer writes what the ring holds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = Command::new("kill")
        .args(["-TERM", &host.serve.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(host.serve.wait().unwrap().success());
    check(&host, &driven);
}

/// acme: a whole answer, a refusal, an abandoned stream; globex: a stream;
/// and a client of an untrusted CA.
async fn drive(host: &Host) -> Driven {
    let mut acme = connect(host, "acme").await;
    let whole = json!({"model": "tiny", "messages": [{"role": "user", "content": "a secret prompt"}],
                       "max_tokens": 12, "temperature": 0});
    acme.ready().await.unwrap();
    let r = acme
        .send_request(request(
            "POST",
            "/v1/chat/completions",
            "sk-acme",
            Some(&whole),
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value =
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let whole_id = answer["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("chatcmpl-")
        .to_owned();
    let whole_text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();

    // A refusal after authentication: a model acme may not use.
    acme.ready().await.unwrap();
    let refused = json!({"model": "other", "prompt": "x"});
    let r = acme
        .send_request(request(
            "POST",
            "/v1/completions",
            "sk-acme",
            Some(&refused),
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let _ = r.into_body().collect().await;

    // A stream the client abandons.
    acme.ready().await.unwrap();
    let long = json!({"model": "tiny", "prompt": "go on", "max_tokens": 1500, "stream": true});
    let r = acme
        .send_request(request("POST", "/v1/completions", "sk-acme", Some(&long)))
        .await
        .unwrap();
    let mut body = r.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);

    // globex, streamed to the end.
    let mut globex = connect(host, "globex").await;
    globex.ready().await.unwrap();
    // A fixed seed: without one the worker seeds from the request id, which
    // starts from the clock, so the tokens differ run to run; once in CI the
    // stream ended after 3 of the 6 tokens (most likely a sampled
    // end-of-text token), failing the count below.
    let streamed =
        json!({"model": "tiny", "prompt": "hello", "max_tokens": 6, "stream": true, "seed": 1});
    let r = globex
        .send_request(request(
            "POST",
            "/v1/completions",
            "sk-globex",
            Some(&streamed),
        ))
        .await
        .unwrap();
    let sse =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    let mut globex_text = String::new();
    for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if let Ok(v) = serde_json::from_str::<Value>(line)
            && let Some(t) = v["choices"][0]["text"].as_str()
        {
            globex_text.push_str(t);
        }
    }

    // A client whose certificate no CA here issued.
    let pki = host.dir.join("pki");
    let untrusted = untrusted_client_is_refused(host, &pki).await;
    assert!(untrusted, "the untrusted client was refused");
    Driven {
        whole,
        answer,
        whole_id,
        whole_text,
        globex_text,
    }
}

/// The log verifies and holds exactly the records of what was driven.
fn check(host: &Host, driven: &Driven) {
    let globex_text = &driven.globex_text;
    let (dir, key) = (path(host, "audit"), path(host, "audit.key"));
    let verified = audit(&["verify", "--dir", &dir, "--key", &key]);
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );

    let keys = check_acme(host, driven);
    let globex_records = records(host, "globex");
    assert_eq!(globex_records.len(), 1, "{globex_records:#?}");
    let g = &globex_records[0];
    assert_eq!(
        (g["status"].as_u64(), g["output_tokens"].as_u64()),
        (Some(200), Some(6))
    );
    let globex_id = TenantId::new("globex").unwrap();
    assert_eq!(
        g["response_digest"],
        hex(&keys.content_digest(&globex_id, globex_text.as_bytes()).0)
    );

    let host_records = records(host, "_host");
    assert!(
        host_records
            .iter()
            .any(|r| r["type"] == "connection_refused"
                && r["reason"].as_str().unwrap().starts_with("tcp handshake")),
        "{host_records:#?}"
    );

    // acme's own key reads acme's partition and nothing else.
    let acme_key = path(host, "acme.key");
    let exported = audit(&[
        "export-key",
        "--master-key",
        &key,
        "--tenant",
        "acme",
        "--out",
        &acme_key,
    ]);
    assert!(exported.status.success());
    let own = audit(&[
        "query", "--dir", &dir, "--key", &acme_key, "--tenant", "acme",
    ]);
    assert!(own.status.success());
    let other = audit(&[
        "query", "--dir", &dir, "--key", &acme_key, "--tenant", "globex",
    ]);
    assert!(!other.status.success());
    assert!(other.stdout.is_empty(), "no plaintext of another tenant");
}

/// acme's three records: the whole answer's (its id, tokens, digests), the
/// refusal's and the abandoned stream's; no content in any.
fn check_acme(host: &Host, driven: &Driven) -> AuditKeys {
    let Driven {
        whole,
        answer,
        whole_id,
        whole_text,
        ..
    } = driven;
    let acme_records: Vec<Value> = records(host, "acme")
        .into_iter()
        .filter(|r| r["type"] == "request")
        .collect();
    let by_status: HashMap<u64, &Value> = acme_records
        .iter()
        .map(|r| (r["status"].as_u64().unwrap(), r))
        .collect();
    assert_eq!(acme_records.len(), 3, "{acme_records:#?}");
    let ok = by_status[&200];
    assert_eq!(ok["request_id"], whole_id.as_str(), "the id the client saw");
    assert_eq!(ok["tenant"], "acme");
    assert_eq!(ok["output_tokens"], answer["usage"]["completion_tokens"]);
    assert_eq!(ok["input_tokens"], answer["usage"]["prompt_tokens"]);
    assert!(ok["ttft_us"].as_u64().unwrap() <= ok["latency_us"].as_u64().unwrap());
    assert_eq!(ok["worker"], 0);
    // Keyed digests of the body sent and the text answered.
    let master = read_master_key(&host.dir.join("audit.key")).unwrap();
    let keys = AuditKeys::new(master);
    let acme_id = TenantId::new("acme").unwrap();
    let sent = whole.to_string();
    assert_eq!(
        ok["prompt_digest"],
        hex(&keys.content_digest(&acme_id, sent.as_bytes()).0)
    );
    assert_eq!(
        ok["response_digest"],
        hex(&keys.content_digest(&acme_id, whole_text.as_bytes()).0)
    );
    assert_eq!(by_status[&403]["error_code"], "model_not_found");
    assert_eq!(by_status[&499]["error_code"], "client_disconnected");
    // No content anywhere in the records.
    let all = serde_json::to_string(&acme_records).unwrap();
    assert!(!all.contains("secret prompt") && !all.contains(whole_text.as_str()));

    keys
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A TLS client with a certificate of the untrusted CA: true if refused.
async fn untrusted_client_is_refused(host: &Host, pki: &std::path::Path) -> bool {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.join("server-ca.pem")).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_file(pki.join("untrusted-client.pem")).unwrap()],
        PrivateKeyDer::from_pem_file(pki.join("untrusted-client.key")).unwrap(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(&host.tcp).await.unwrap();
    let Ok(mut stream) = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
    else {
        return true;
    };
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf).await, Err(_) | Ok(0))
}
