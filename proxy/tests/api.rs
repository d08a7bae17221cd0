//! The OpenAI-compatible API over real `sim` workers, without a transport:
//! answers, streams, and every refusal with its status and error body.

use bulkhead::{
    api::{App, metrics::Metrics},
    dispatch::{Dispatcher, WorkerSpec},
    front::{ApiRequest, ApiResponse, Handler, Peer, Protocol, ResponseBody},
    serve::{audit::AuditLog, plan::tenant_slots},
};
use bulkhead_core::{
    TenantId,
    config::Config,
    fair_queue::ServiceWeights,
    identity::{ApiKeyHash, IdentityError},
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

const ACME_KEY: &str = "sk-acme-test-key";
const GLOBEX_KEY: &str = "sk-globex-test-key";

fn config() -> Config {
    let toml = format!(
        r#"
trust_domain = "bulkhead.test"
[tls]
cert = "unused.pem"
key = "unused.key"
client_ca = ["unused-ca.pem"]
[kv]
pool_blocks = 1024
[[models]]
name = "tiny"
backend = "sim"
max_context_tokens = 2048
[[models]]
name = "big"
backend = "sim"
max_context_tokens = 2048
[[tenants]]
id = "acme"
allowed_models = ["tiny"]
max_prompt_bytes = 4096
max_tokens_per_request = 64
kv_block_quota = 512
api_key_sha256 = ["{}"]
[[tenants]]
id = "globex"
allowed_models = ["tiny", "big"]
requests_per_second = 0.5
request_burst = 2
kv_block_quota = 512
api_key_sha256 = ["{}"]
"#,
        ApiKeyHash::of(ACME_KEY).to_hex(),
        ApiKeyHash::of(GLOBEX_KEY).to_hex()
    );
    Config::from_toml_str(&toml).unwrap()
}

async fn app(name: &str) -> (Arc<App>, PathBuf) {
    let (app, dir) = bare_app(name).await;
    (Arc::new(app), dir)
}

/// [`app`], not yet shared (to add an audit log).
async fn bare_app(name: &str) -> (App, PathBuf) {
    let config = config();
    let dir = std::env::temp_dir().join(format!("bh-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let workers = ["tiny", "big"]
        .iter()
        .enumerate()
        .map(|(i, model)| WorkerSpec {
            id: u32::try_from(i).unwrap(),
            socket: dir.join(format!("w{i}.sock")),
            spawn_args: Some(
                [
                    "--backend",
                    "sim",
                    "--sim-fast",
                    "--model-name",
                    model,
                    "--blocks",
                    "512",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
            dedicated: None,
            program: Some(PathBuf::from(env!("CARGO_BIN_EXE_bulkhead"))),
        })
        .collect();
    // All shared here: the config's tenants are all of isolation `shared`.
    let tenants = tenant_slots(&config);
    let dispatcher = Dispatcher::start(
        ServiceWeights::default(),
        &tenants,
        workers,
        Duration::from_millis(100),
    );
    assert!(dispatcher.wait_ready(Duration::from_mins(1)).await);
    let app = App::new(config, dispatcher, Arc::new(Metrics::default())).unwrap();
    (app, dir)
}

fn request(
    tenant: Result<&str, IdentityError>,
    method: Method,
    path: &str,
    body: &Value,
) -> ApiRequest {
    ApiRequest {
        method,
        path: path.to_owned(),
        headers: HeaderMap::new(),
        body: body.to_string().into(),
        peer: Peer {
            tenant: tenant.map(|t| TenantId::new(t).unwrap()),
            remote: "127.0.0.1:1".parse().unwrap(),
            protocol: Protocol::Http2,
        },
    }
}

#[allow(clippy::needless_pass_by_value)] // call sites read better with values
fn chat(tenant: &str, body: Value) -> ApiRequest {
    request(Ok(tenant), Method::POST, "/v1/chat/completions", &body)
}

async fn body_of(r: ApiResponse) -> String {
    match r.body {
        ResponseBody::Full(b) => String::from_utf8(b.to_vec()).unwrap(),
        ResponseBody::Stream(mut rx) => {
            let mut s = String::new();
            while let Some(chunk) = rx.recv().await {
                s.push_str(std::str::from_utf8(&chunk).unwrap());
            }
            s
        }
    }
}

async fn error_of(app: &App, req: ApiRequest) -> (StatusCode, HeaderMap, Value) {
    let r = app.handle(req).await;
    let (status, headers) = (r.status, r.headers.clone());
    let body: Value = serde_json::from_str(&body_of(r).await).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (status, headers, body)
}

/// A request's future is allocated and copied per request and touched by
/// every poll: it stays a few KiB. (In release builds it had grown to 25
/// KiB, and the transport's request future around it to 52 KiB, each async
/// layer holding its callee's future twice, rust-lang/rust#62958, until the
/// deepest large one, the answer's, was boxed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_future_stays_small() {
    let (app, dir) = app("future-size").await;
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]});
    let future = app.handle(chat("acme", body));
    let size = std::mem::size_of_val(&future);
    assert!(size <= 4096, "App::handle's future is {size} bytes");
    drop(future);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_whole_and_streamed_agree() {
    let (app, dir) = app("answers").await;
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0, "seed": 3});
    let r = app.handle(chat("acme", body.clone())).await;
    assert_eq!(r.status, StatusCode::OK);
    let whole: Value = serde_json::from_str(&body_of(r).await).unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 12);
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = app.handle(chat("acme", streamed)).await;
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let sse = body_of(r).await;
    let events: Vec<&str> = sse.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let mut joined = String::new();
    let mut usage = None;
    let mut reason = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(c) = v["choices"].get(0) {
            joined.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if !c["finish_reason"].is_null() {
                reason = Some(c["finish_reason"].clone());
            }
        } else {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(joined, text, "the stream and the whole answer differ");
    assert_eq!(reason, Some(json!("length")));
    assert_eq!(usage.unwrap()["completion_tokens"], 12);

    // Text completions and the model list.
    let r = app
        .handle(request(
            Ok("acme"),
            Method::POST,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "x", "max_tokens": 3}),
        ))
        .await;
    let v: Value = serde_json::from_str(&body_of(r).await).unwrap();
    assert_eq!(v["object"], "text_completion");
    let r = app
        .handle(request(Ok("acme"), Method::GET, "/v1/models", &Value::Null))
        .await;
    let v: Value = serde_json::from_str(&body_of(r).await).unwrap();
    assert_eq!(
        v["data"].as_array().unwrap().len(),
        1,
        "acme may use tiny only: {v}"
    );
    let r = app
        .handle(request(Ok("acme"), Method::GET, "/metrics", &Value::Null))
        .await;
    let metrics = body_of(r).await;
    assert!(
        metrics.contains("bulkhead_requests_total{tenant=\"acme\",status=\"200\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("bulkhead_time_to_first_token_seconds_count{tenant=\"acme\"} 3"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_honest_statuses_and_openai_bodies() {
    let (app, dir) = app("refusals").await;
    let ok =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});

    let (s, _, _) = error_of(
        &app,
        request(
            Err(IdentityError::NoSpiffeId),
            Method::POST,
            "/v1/chat/completions",
            &ok.clone(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, b) = error_of(&app, chat("initech", ok.clone())).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not configured")
    );

    let mut foreign = chat("acme", ok.clone());
    foreign.headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {GLOBEX_KEY}")).unwrap(),
    );
    let (s, _, _) = error_of(&app, foreign).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "globex's key on acme's certificate"
    );
    // The scheme is case-insensitive; a header of another scheme is a 401.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let mut own = chat("acme", ok.clone());
        own.headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("{scheme} {ACME_KEY}")).unwrap(),
        );
        assert_eq!(app.handle(own).await.status, StatusCode::OK, "{scheme}");
    }
    let mut basic = chat("acme", ok.clone());
    basic.headers.insert(
        "authorization",
        HeaderValue::from_static("Basic YWNtZTpwdw=="),
    );
    let (s, _, _) = error_of(&app, basic).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, _, b) = error_of(
        &app,
        chat(
            "acme",
            json!({"model": "big", "messages": [{"role": "user", "content": "hi"}]}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(b["error"]["code"], "model_not_found");
    let huge = "x".repeat(5_000);
    let (s, _, _) = error_of(
        &app,
        chat(
            "acme",
            json!({"model": "tiny", "messages": [{"role": "user", "content": huge}]}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let mut bad = chat("acme", Value::Null);
    bad.body = "{\"model\": \"tiny\", \"messages\": [".into();
    let (s, _, b) = error_of(&app, bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["type"], "invalid_request_error");

    // globex: 0.5 requests/s with a burst of 2: the third in a row is refused.
    for _ in 0..2 {
        assert_eq!(
            app.handle(chat("globex", ok.clone())).await.status,
            StatusCode::OK
        );
    }
    let (s, headers, b) = error_of(&app, chat("globex", ok.clone())).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(b["error"]["type"], "rate_limit_error");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // acme is not slowed by globex's limit.
    assert_eq!(app.handle(chat("acme", ok)).await.status, StatusCode::OK);
    let _ = std::fs::remove_dir_all(dir);
}

/// acme has a worker of its own (isolation `process`); globex shares the pool.
async fn isolated_app(name: &str) -> (Arc<App>, PathBuf) {
    let mut config = config();
    config.tenants[0].isolation = bulkhead_core::IsolationLevel::Process;
    let dir = std::env::temp_dir().join(format!("bh-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let worker = |id: u32, dedicated: Option<&str>| WorkerSpec {
        id,
        socket: dir.join(format!("w{id}.sock")),
        // Real-time pacing: a long request is still running when we kill its worker.
        spawn_args: Some(
            [
                "--backend",
                "sim",
                "--model-name",
                "tiny",
                "--blocks",
                "512",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        dedicated: dedicated.map(|t| TenantId::new(t).unwrap()),
        program: Some(PathBuf::from(env!("CARGO_BIN_EXE_bulkhead"))),
    };
    let workers = vec![worker(0, Some("acme")), worker(1, None)];
    let tenants = tenant_slots(&config);
    let dispatcher = Dispatcher::start(
        ServiceWeights::default(),
        &tenants,
        workers,
        Duration::from_millis(100),
    );
    assert!(dispatcher.wait_ready(Duration::from_mins(1)).await);
    let app = App::new(config, dispatcher, Arc::new(Metrics::default())).unwrap();
    (Arc::new(app), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_fails_its_streams_only_and_comes_back() {
    let (app, dir) = isolated_app("kill").await;
    let body = json!({"model": "tiny", "stream": true, "max_tokens": 40,
                      "messages": [{"role": "user", "content": "hi"}]});
    let open = |tenant: &str| {
        let app = app.clone();
        let req = chat(tenant, body.clone());
        async move {
            let r = app.handle(req).await;
            assert_eq!(r.status, StatusCode::OK);
            let ResponseBody::Stream(rx) = r.body else {
                panic!("not a stream")
            };
            rx
        }
    };
    let mut acme = open("acme").await;
    let globex = open("globex").await;
    // acme's first chunk arrives, then its worker dies.
    let first = acme.recv().await.unwrap();
    assert!(first.starts_with(b"data: {"));
    let sock0 = dir.join("w0.sock");
    assert!(
        std::process::Command::new("pkill")
            .args(["-KILL", "-f", &sock0.display().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut rest = String::new();
    while let Some(chunk) = acme.recv().await {
        rest.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let last = rest.trim_end().rsplit("\n\n").next().unwrap();
    let err: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "worker_failed", "{rest}");
    assert!(!rest.contains("[DONE]"));
    // globex, on the shared worker, completes.
    let mut globex = globex;
    let mut text = String::new();
    while let Some(chunk) = globex.recv().await {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // acme's worker comes back and serves acme again.
    let deadline = tokio::time::Instant::now() + Duration::from_mins(1);
    loop {
        let r = app
            .handle(chat(
                "acme",
                json!({"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
            ))
            .await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acme's worker never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// [`bare_app`] recording into an audit log of its own.
async fn audited_app(name: &str) -> (App, AuditLog, PathBuf) {
    let (app, dir) = bare_app(name).await;
    let mut settings = config().audit;
    settings.dir = dir.join("audit");
    settings.key_file = dir.join("audit.key");
    let log = bulkhead::serve::audit::open(&settings).unwrap();
    (app.with_audit(log.hook.clone()), log, dir)
}

/// Once nothing is pending, exactly one record (`what`'s) is in the ring;
/// then the log closes and the directory goes.
async fn one_record_settles(log: AuditLog, dir: &Path, what: &str) {
    assert!(
        log.hook.records_settled(Duration::from_secs(10)).await,
        "{} records still pending",
        log.hook.pending_records()
    );
    assert_eq!(log.hook.counters().submitted, 1, "{what}");
    log.writer.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A stream whose transport goes away submits its record from its own
/// task, after the transport is done with it; the audit hook counts it
/// pending until then, which is what a shutdown waits for before it closes
/// the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_off_is_a_pending_record_until_it_is_in_the_ring() {
    let (app, log, dir) = audited_app("stream-ends").await;
    assert_eq!(log.hook.pending_records(), 0);
    // More chunks than the stream's channel holds (64): unread, it blocks.
    let body = json!({"model": "big", "messages": [{"role": "user", "content": "go on"}],
                      "max_tokens": 400, "stream": true, "seed": 3});
    let r = app.handle(chat("globex", body)).await;
    assert_eq!(r.status, StatusCode::OK);
    let ResponseBody::Stream(rx) = r.body else {
        panic!("not a stream")
    };
    // The transport goes away without reading.
    drop(rx);
    one_record_settles(log, &dir, "the stream's record").await;
}

/// A whole answer's request dropped while it waits (its connection was
/// aborted) submits its record from the drop, and is pending until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_request_is_a_pending_record_until_its_drop_submits_it() {
    let (app, log, dir) = audited_app("abort-ends").await;
    let app = Arc::new(app);
    let body = json!({"model": "big", "messages": [{"role": "user", "content": "go on"}],
                      "max_tokens": 400, "seed": 3});
    let task = {
        let app = Arc::clone(&app);
        tokio::spawn(async move { app.handle(chat("globex", body)).await })
    };
    // Wait until it is admitted (its record started), then abort it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while log.hook.pending_records() == 0 && !task.is_finished() {
        assert!(std::time::Instant::now() < deadline, "never admitted");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    task.abort();
    one_record_settles(log, &dir, "the request's record").await;
}
