//! Hot reload of a running `bulkhead serve` (real processes, loopback):
//! SIGHUP and `bulkhead reload` apply new tenants, keys and limits to new
//! requests while an open h2 connection and a stream in flight carry on;
//! a reload that needs a restart, or a broken file, changes nothing.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::SendRequest;
use serde_json::{Value, json};
use std::{
    process::{Command, Stdio},
    time::Duration,
};

mod common;

use common::{BIN, Host, config, connect, request, start, tenant, try_connect};

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
    // `bulkhead reload`: acme's rate drops to a burst of 4 across the fleet,
    // and this host becomes a quarter of the fleet: a burst of 1 here.
    let slow = tenant("acme", "sk-acme-2", 0.1).replace("request_burst = 50", "request_burst = 4");
    rewrite(
        host,
        &(slow + &tenant("initech", "sk-initech", 100.0) + "[cluster]\nhost_share = 0.25\n"),
        1024,
    );
    let out = reload(host);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["host_share"], 0.25, "{report}");
    // initech's file entry is unchanged, but its limits here are a quarter now.
    assert_eq!(
        report["tenants"]["changed"],
        json!(["acme", "initech"]),
        "{report}"
    );
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
    // A burst of 4 would admit all three; this host's 1 admits at most one
    // (none if the earlier stream's use is still in the bucket).
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(
        refused >= 2 && statuses.iter().all(|s| s.is_success() || s.as_u16() == 429),
        "the new limit applies, this host's share of it: {statuses:?}"
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
