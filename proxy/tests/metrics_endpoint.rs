//! The metrics endpoint (`[listeners] metrics`), end to end: plain HTTP on
//! a TCP address, `GET /metrics` with the host's series after real traffic
//! and `GET /healthz`; nothing of the admin endpoint's (tenants' settings,
//! workers, reload) is reachable there.

mod common;

use common::{Host, admin_get, admin_get_text, connect, request, start, tenant};
use http::StatusCode;
use http_body_util::BodyExt as _;
use serde_json::json;
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

/// `method path` on the metrics endpoint: the status and the body.
fn metrics_call(host: &Host, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(&host.metrics).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: metrics\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_metrics_and_health_and_nothing_else() {
    let host = start("metrics", &tenant("acme", "sk-acme", 100.0));
    assert!(
        host.metrics.starts_with("127.0.0.1:") && !host.metrics.ends_with(":0"),
        "serve reports the port it bound: {}",
        host.metrics
    );
    // Healthy once the worker is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = metrics_call(&host, "GET", "/healthz");
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz stayed {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut acme = connect(&host, "acme").await;
    acme.ready().await.unwrap();
    let body = json!({"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0});
    let response = acme
        .send_request(request("POST", "/v1/completions", "sk-acme", Some(&body)))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();

    let (status, text) = metrics_call(&host, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(
        text.contains("bulkhead_requests_total{tenant=\"acme\",status=\"200\"} 1"),
        "acme's answered request is counted:\n{text}"
    );
    // The same series as the admin endpoint's /metrics (one scrape each).
    let series = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("bulkhead_requests_total"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(series(&text), series(&admin_get_text(&host, "/metrics")));

    // Nothing else: no tenants' settings, no workers, no reload.
    for (method, path) in [
        ("GET", "/tenants"),
        ("GET", "/workers"),
        ("POST", "/reload"),
        ("GET", "/v1/models"),
    ] {
        let (status, body) = metrics_call(&host, method, path);
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(body.contains("admin endpoint"), "{body}");
    }
    assert_eq!(metrics_call(&host, "POST", "/metrics").0, 405);
    // The admin endpoint still has them.
    assert!(admin_get(&host, "/tenants")["tenants"].is_array());

    // Clients that connect and send nothing cannot hold the endpoint: each
    // is dropped 5 s after connecting, and a scraper behind 20 of them (the
    // endpoint serves 16 at a time) is answered once the first 16 are gone.
    let silent: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&host.metrics).unwrap())
        .collect();
    let started = Instant::now();
    let (status, _) = metrics_call(&host, "GET", "/healthz");
    assert_eq!(status, 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(20),
        "answered after {waited:?}: the silent connections held it until their timeout"
    );
    drop(silent);
}
