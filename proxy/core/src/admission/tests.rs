use super::*;
use crate::config::Config;
use std::time::Duration;

const CONFIG: &str = r#"
trust_domain = "bulkhead.local"
[tls]
cert = "s.pem"
key = "s.key"
client_ca = ["ca.pem"]
[kv]
pool_blocks = 1024
[[models]]
name = "tiny-llama"
max_context_tokens = 4096
[[models]]
name = "big"
max_context_tokens = 4096
[[tenants]]
id = "alice"
allowed_models = ["tiny-llama"]
max_tokens_per_request = 512
max_prompt_bytes = 10000
requests_per_second = 2.0
request_burst = 2
tokens_per_minute = 6000
max_concurrent_requests = 3
max_queued_requests = 4
kv_block_quota = 64
"#;

#[test]
fn the_config_feeds_the_fair_queue_weights() {
    let config = Config::from_toml_str(CONFIG).unwrap();
    let weights = crate::fair_queue::ServiceWeights::from(config.scheduler);
    assert_eq!(weights, crate::fair_queue::ServiceWeights::default());
}

fn policy() -> TenantPolicy {
    Config::from_toml_str(CONFIG).unwrap().tenants[0].clone()
}

fn request(model: &str, prompt_tokens: u32, max_tokens: u32) -> AdmissionRequest<'_> {
    AdmissionRequest {
        model,
        prompt_bytes: u64::from(prompt_tokens) * 4,
        prompt_tokens,
        max_tokens,
    }
}

const EMPTY: QueueState = QueueState { queued: 0 };
const T0: Timestamp = Timestamp::ZERO;

#[test]
fn a_request_within_policy_is_admitted_and_reserves_its_tokens() {
    let policy = policy();
    let mut limiter = limiter_for(&policy).unwrap();
    let admitted = admit(
        T0,
        &policy,
        &mut limiter,
        EMPTY,
        &request("tiny-llama", 100, 200),
    )
    .unwrap();
    assert_eq!(admitted.reserved_tokens(), 300);
    assert_eq!(limiter.available_tokens(T0), 5_700);
    assert_eq!(limiter.in_flight(), 1);
    // 120 tokens were used: 180 come back, and the concurrency slot is freed.
    limiter.complete(T0, admitted, 120);
    assert_eq!(limiter.available_tokens(T0), 5_880);
    assert_eq!(limiter.in_flight(), 0);
}

#[test]
fn each_refusal_has_its_status_and_openai_error() {
    let policy = policy();
    let mut limiter = limiter_for(&policy).unwrap();
    let cases = [
        (
            request("big", 10, 10),
            403,
            "model_not_found",
            "model 'big' is not available to this tenant",
        ),
        (
            request("gpt-9", 10, 10),
            403,
            "model_not_found",
            "model 'gpt-9' is not available to this tenant",
        ),
        (
            request("tiny-llama", 10, 0),
            400,
            "invalid_value",
            "max_tokens must be at least 1",
        ),
        (
            request("tiny-llama", 10, 513),
            400,
            "invalid_value",
            "max_tokens is 513, above this tenant's limit of 512",
        ),
        (
            request("tiny-llama", 2_501, 10),
            413,
            "prompt_too_large",
            "prompt is 10004 bytes, above this tenant's limit of 10000",
        ),
        (
            request("tiny-llama", 5_900, 512).with_bytes(100),
            400,
            "context_length_exceeded",
            "request needs 6412 tokens (prompt + max_tokens), more than this tenant's budget of 6000 per minute",
        ),
    ];
    for (req, status, code, message) in cases {
        let err = admit(T0, &policy, &mut limiter, EMPTY, &req).unwrap_err();
        assert_eq!(err.http_status(), status, "{err}");
        assert_eq!(err.to_string(), message);
        let body = err.error_body();
        assert_eq!(body["error"]["code"], code);
        assert_eq!(body["error"]["message"], message);
        assert_eq!(err.retry_after_secs(), None);
    }
    // Nothing was consumed by any of them.
    assert_eq!(limiter.available_requests(T0), 2);
    assert_eq!(limiter.available_tokens(T0), 6_000);
}

/// What needs no token count is refused alike before the prompt is
/// tokenized and by admission after it, and admits what admission admits.
#[test]
fn authorizing_a_prompt_agrees_with_admission() {
    let policy = policy();
    let mut limiter = limiter_for(&policy).unwrap();
    for (model, bytes) in [
        ("big", 10),
        ("tiny-llama", policy.max_prompt_bytes + 1),
        ("tiny-llama", policy.max_prompt_bytes),
    ] {
        let early = authorize_prompt(&policy, model, bytes);
        let full = admit(
            T0,
            &policy,
            &mut limiter,
            EMPTY,
            &AdmissionRequest {
                model,
                prompt_bytes: bytes,
                prompt_tokens: 1,
                max_tokens: 1,
            },
        );
        match (early, full) {
            (Err(a), Err(b)) => assert_eq!(a, b),
            (Ok(()), Ok(admitted)) => {
                limiter.complete(T0, admitted, 0);
            }
            other => panic!("{model} {bytes}: {other:?}"),
        }
    }
}

#[test]
fn a_full_backlog_refuses_with_429_before_touching_the_limits() {
    let policy = policy();
    let mut limiter = limiter_for(&policy).unwrap();
    let err = admit(
        T0,
        &policy,
        &mut limiter,
        QueueState { queued: 4 },
        &request("tiny-llama", 1, 1),
    )
    .unwrap_err();
    assert_eq!(err, Rejection::QueueFull { cap: 4 });
    assert_eq!(err.http_status(), 429);
    assert_eq!(err.error_body()["error"]["type"], "rate_limit_error");
    assert_eq!(limiter.available_requests(T0), 2);
}

#[test]
fn a_rate_limited_burst_gets_an_exact_retry_after() {
    let policy = policy();
    let mut limiter = limiter_for(&policy).unwrap();
    let req = request("tiny-llama", 10, 10);
    let _first = admit(T0, &policy, &mut limiter, EMPTY, &req).unwrap();
    let _second = admit(T0, &policy, &mut limiter, EMPTY, &req).unwrap();
    let at = Timestamp::from_nanos(100_000_000);
    let err = admit(at, &policy, &mut limiter, EMPTY, &req).unwrap_err();
    // 2 requests/s: the next cell is due 500 ms after the first two, 400 ms from now.
    assert_eq!(
        err,
        Rejection::RateLimited {
            kind: LimitKind::RequestRate,
            retry_after: Some(Duration::from_millis(400)),
        }
    );
    assert_eq!(err.http_status(), 429);
    assert_eq!(err.retry_after_secs(), Some(1));
    assert_eq!(
        err.to_string(),
        "request rate limit reached; retry after 0.400 s"
    );
    assert!(
        admit(
            at + Duration::from_millis(400),
            &policy,
            &mut limiter,
            EMPTY,
            &req
        )
        .is_ok()
    );
}

#[test]
fn concurrency_refusal_has_no_retry_time() {
    let mut policy = policy();
    policy.request_burst = 10;
    policy.requests_per_second = 100.0;
    let mut limiter = limiter_for(&policy).unwrap();
    let req = request("tiny-llama", 10, 10);
    let held: Vec<_> = (0..3)
        .map(|_| admit(T0, &policy, &mut limiter, EMPTY, &req).unwrap())
        .collect();
    let err = admit(T0, &policy, &mut limiter, EMPTY, &req).unwrap_err();
    assert_eq!(
        err,
        Rejection::RateLimited {
            kind: LimitKind::Concurrency,
            retry_after: None,
        }
    );
    assert_eq!(err.retry_after_secs(), None);
    for a in held {
        limiter.complete(T0, a, 20);
    }
    assert!(admit(T0, &policy, &mut limiter, EMPTY, &req).is_ok());
}

impl AdmissionRequest<'_> {
    fn with_bytes(mut self, bytes: u64) -> Self {
        self.prompt_bytes = bytes;
        self
    }
}
