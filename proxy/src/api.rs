//! The OpenAI-compatible API: the request's phases after the transport.
//!
//! authenticate (tenant from the certificate; a bearer key must be the same
//! tenant's) → authorize and limit (`bulkhead_core::admission`) → enqueue
//! and dispatch ([`crate::dispatch`]) → stream (SSE chunks, `usage`, then
//! `[DONE]`) → account (limiter refund, metrics). Every refusal is an
//! OpenAI error body with an honest status.

pub mod metrics;
pub mod openai;
pub mod record;
pub mod text;

use self::{
    metrics::{KernelCounts, Metrics},
    openai::Kind,
    record::{AuditHook, Record, RequestFacts},
    text::{ModelText, OutputText},
};
use crate::{
    dispatch::{DispatchError, Dispatcher, Event, Job},
    ebpf::KernelFlows,
    front::{ApiRequest, ApiResponse, Handler, ResponseBody},
};
use bulkhead_core::{
    TenantId, Timestamp,
    admission::{self, AdmissionRequest, QueueState},
    config::{Config, TenantPolicy},
    identity::{ApiKeyId, ApiKeyRegistry, TenantApiKeys},
    limits::TenantLimiter,
    wire::{FinishReason, Finished, Sampling},
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{Value, json};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::{Instant, SystemTime},
};
use tokio::sync::mpsc;

/// A tenant's policy and its live limiter.
#[derive(Debug)]
struct TenantState {
    policy: TenantPolicy,
    limiter: Arc<Mutex<TenantLimiter>>,
}

/// The tenant side of the config, swapped whole by a reload: each request
/// reads one snapshot from start to end.
#[derive(Debug)]
struct Policy {
    config: Config,
    tenants: HashMap<TenantId, TenantState>,
    keys: ApiKeyRegistry,
}

/// The API: tenants, limiters, the dispatcher and the metrics.
#[derive(Debug)]
pub struct App {
    policy: RwLock<Arc<Policy>>,
    dispatcher: Dispatcher,
    metrics: Arc<Metrics>,
    /// Each configured model's text side (models change only with a restart).
    texts: HashMap<String, Arc<ModelText>>,
    /// For a model not configured: the request is refused at admission,
    /// after its prompt is counted with this.
    builtin: Arc<ModelText>,
    epoch: Instant,
    kernel: Option<(Arc<Mutex<crate::ebpf::KernelPlane>>, Arc<KernelFlows>)>,
    audit: Option<AuditHook>,
}

/// What a reload changed in the tenants.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TenantChanges {
    /// Tenants new in the config.
    pub added: Vec<TenantId>,
    /// Tenants no longer in it: their new requests are refused; requests
    /// already admitted finish.
    pub removed: Vec<TenantId>,
    /// Tenants whose policy changed (limits, models, keys, weight, ...).
    pub changed: Vec<TenantId>,
}

/// An error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    param: Option<&'static str>,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    fn response(&self) -> ApiResponse {
        let mut r = ApiResponse::full(self.status, "application/json", self.body().to_string());
        if let Some(secs) = self.retry_after {
            r.headers
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

impl App {
    /// The API over `config`'s tenants and `dispatcher`.
    pub fn new(
        config: Config,
        dispatcher: Dispatcher,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let texts = ModelText::load_all(&config)?;
        Self::with_texts(config, dispatcher, metrics, texts)
    }

    /// [`Self::new`] with the models' text sides already loaded
    /// ([`ModelText::load_all`]: `serve` loads them before its workers start).
    pub fn with_texts(
        config: Config,
        dispatcher: Dispatcher,
        metrics: Arc<Metrics>,
        texts: HashMap<String, Arc<ModelText>>,
    ) -> anyhow::Result<Self> {
        let policy = Policy::build(config, &HashMap::new(), Timestamp::ZERO)?;
        Ok(Self {
            policy: RwLock::new(Arc::new(policy)),
            dispatcher,
            metrics,
            texts,
            builtin: Arc::new(ModelText::builtin()),
            epoch: Instant::now(),
            kernel: None,
            audit: None,
        })
    }

    /// Reports the kernel programs' per-tenant packet counters in
    /// `/metrics`, naming each slot by `flows`' assignment.
    #[must_use]
    pub fn with_kernel(
        mut self,
        plane: Arc<Mutex<crate::ebpf::KernelPlane>>,
        flows: Arc<KernelFlows>,
    ) -> Self {
        self.kernel = Some((plane, flows));
        self
    }

    /// Leaves one audit record per completion request in `audit`'s ring
    /// (module [`record`]).
    #[must_use]
    pub fn with_audit(mut self, audit: AuditHook) -> Self {
        self.audit = Some(audit);
        self
    }

    /// The current tenant policy.
    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The config the API serves now.
    pub fn config(&self) -> Config {
        self.policy().config.clone()
    }

    /// Takes the tenants of `config` (already checked for what a reload may
    /// change): new policies, keys and limits apply to requests that start
    /// from now on. A tenant's limiter keeps its state across the change
    /// (what was used stays used); the dispatcher takes the new weights and
    /// queue caps. Nothing changes if it fails.
    pub fn reload(&self, config: Config) -> anyhow::Result<TenantChanges> {
        let mut slot = self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = slot.clone();
        let next = Policy::build(config, &old.tenants, self.now())?;
        let mut changes = TenantChanges::default();
        for t in &next.config.tenants {
            match old.tenants.get(&t.id) {
                None => changes.added.push(t.id.clone()),
                Some(o) if o.policy != *t => changes.changed.push(t.id.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old
            .config
            .tenants
            .iter()
            .filter(|t| !next.tenants.contains_key(&t.id))
            .map(|t| t.id.clone())
            .collect();
        self.dispatcher
            .set_tenants(&crate::serve::plan::tenant_slots(&next.config));
        *slot = Arc::new(next);
        Ok(changes)
    }

    /// Per tenant (by id), packets the kernel passed and dropped.
    fn kernel_counts(&self) -> BTreeMap<String, KernelCounts> {
        let Some((plane, flows)) = &self.kernel else {
            return BTreeMap::new();
        };
        let counters = match plane
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .counters()
        {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!("reading the kernel counters failed: {}", err.chain());
                return BTreeMap::new();
            }
        };
        counters
            .into_iter()
            .map(|(index, c)| {
                let name = flows
                    .tenant_of(index)
                    .map_or_else(|| "unknown".to_owned(), |t| t.to_string());
                (
                    name,
                    KernelCounts {
                        passed: c.ingress_passed_packets,
                        dropped: c.ingress_dropped_packets,
                    },
                )
            })
            .collect()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The workers, for the admin endpoint.
    pub fn workers(&self) -> Vec<crate::dispatch::WorkerView> {
        self.dispatcher.worker_views()
    }

    /// Every tenant's metrics, the kernel counters and the audit log's, for
    /// the admin endpoint.
    pub fn host_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = self.metrics.render(None, &self.kernel_counts());
        if let Some(audit) = &self.audit {
            let c = audit.counters();
            let _ = write!(
                out,
                "# HELP bulkhead_audit_records_total Audit records, by state (submitted to the ring, written and fsynced).\n\
                 # TYPE bulkhead_audit_records_total counter\n\
                 bulkhead_audit_records_total{{state=\"submitted\"}} {}\n\
                 bulkhead_audit_records_total{{state=\"written\"}} {}\n\
                 # HELP bulkhead_audit_ring_depth Audit records waiting for the writer.\n\
                 # TYPE bulkhead_audit_ring_depth gauge\n\
                 bulkhead_audit_ring_depth {}\n\
                 # HELP bulkhead_audit_ring_capacity Audit records the ring holds.\n\
                 # TYPE bulkhead_audit_ring_capacity gauge\n\
                 bulkhead_audit_ring_capacity {}\n\
                 # HELP bulkhead_audit_full_total Submissions refused because the ring stayed full.\n\
                 # TYPE bulkhead_audit_full_total counter\n\
                 bulkhead_audit_full_total {}\n\
                 # HELP bulkhead_audit_write_errors_total Write or fsync failures of the audit writer (each retried).\n\
                 # TYPE bulkhead_audit_write_errors_total counter\n\
                 bulkhead_audit_write_errors_total {}\n",
                c.submitted,
                c.written,
                c.ring_depth,
                c.ring_capacity,
                c.full_refusals,
                c.write_errors
            );
        }
        out
    }

    /// The dispatcher's workers and queue, for `/healthz`.
    pub(crate) fn health(&self) -> ApiResponse {
        let workers = self.dispatcher.workers();
        let alive = workers.iter().filter(|w| w.1).count();
        let status = if alive > 0 {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        ApiResponse::full(
            status,
            "application/json",
            json!({"workers": workers.len(), "alive": alive, "queued": self.dispatcher.queued()})
                .to_string(),
        )
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_duration(self.epoch.elapsed())
    }

    /// The tenant of a request: its certificate's, narrowed by a bearer key if present.
    fn authenticate<'p>(
        policy: &'p Policy,
        req: &ApiRequest,
    ) -> Result<(&'p TenantState, Option<ApiKeyId>), ApiError> {
        let unauthorized = |m: String| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                m,
            )
        };
        let tenant = req
            .peer
            .tenant
            .as_ref()
            .map_err(|e| unauthorized(e.to_string()))?;
        let state = policy.tenants.get(tenant).ok_or_else(|| {
            unauthorized(format!("tenant {tenant} is not configured on this host"))
        })?;
        let bearer = match req.headers.get(http::header::AUTHORIZATION) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.split_once(' '))
                    // The scheme is case-insensitive (RFC 9110 §11.1).
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, key)| key.trim_start())
                    .ok_or_else(|| {
                        unauthorized("the Authorization header must be `Bearer <key>`".to_owned())
                    })?,
            ),
        };
        let identity = policy.keys.authenticate(tenant, bearer).map_err(|e| {
            let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let code = if status == StatusCode::FORBIDDEN {
                "permission_denied"
            } else {
                "invalid_api_key"
            };
            ApiError::new(status, "invalid_request_error", code, e.to_string())
        })?;
        Ok((state, identity.api_key()))
    }

    fn models(policy: &Policy, tenant: &TenantState) -> ApiResponse {
        let data: Vec<Value> = policy
            .config
            .models
            .iter()
            .filter(|m| tenant.policy.allows_model(&m.name))
            .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "bulkhead"}))
            .collect();
        ApiResponse::full(
            StatusCode::OK,
            "application/json",
            json!({"object": "list", "data": data}).to_string(),
        )
    }

    /// [`Self::complete`], and the audit record of a refusal after authentication.
    async fn complete_recorded(
        &self,
        req: ApiRequest,
        kind: Kind,
        arrived: Instant,
    ) -> Result<ApiResponse, (Option<TenantId>, ApiError)> {
        let (body, source) = (req.body.clone(), req.peer.remote);
        let result = self.complete(req, kind, arrived).await;
        if let (Err((Some(tenant), e)), Some(audit)) = (&result, &self.audit) {
            #[derive(serde::Deserialize)]
            struct Named {
                model: String,
            }
            let model =
                serde_json::from_slice::<Named>(&body).map_or_else(|_| String::new(), |n| n.model);
            let facts = RequestFacts {
                tenant,
                model: &model,
                body: &body,
                source,
                api_key: None,
            };
            audit.refused(facts, e.status.as_u16(), e.code).await;
        }
        result
    }

    async fn complete(
        &self,
        req: ApiRequest,
        kind: Kind,
        arrived: Instant,
    ) -> Result<ApiResponse, (Option<TenantId>, ApiError)> {
        let policy = self.policy();
        let (tenant, api_key) = Self::authenticate(&policy, &req).map_err(|e| (None, e))?;
        let id = tenant.policy.id.clone();
        let fail = |e: ApiError| (Some(id.clone()), e);
        self.audit_gate().map_err(fail)?;
        let parsed = openai::parse(kind, &req.body).map_err(|b| {
            let mut e = ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
                b.message,
            );
            e.param = b.param;
            fail(e)
        })?;
        let (model_text, prompt_tokens) = self.tokenize(tenant, &parsed).map_err(fail)?;
        let context = policy
            .config
            .model(&parsed.model)
            .map_or(2048, |m| m.max_context_tokens);
        let room = context.saturating_sub(u32::try_from(prompt_tokens.len()).unwrap_or(u32::MAX));
        let max_tokens = parsed
            .max_tokens
            .unwrap_or_else(|| tenant.policy.max_tokens_per_request.min(room).max(1));
        let request = AdmissionRequest {
            model: &parsed.model,
            prompt_bytes: parsed.prompt.content_bytes() as u64,
            prompt_tokens: u32::try_from(prompt_tokens.len()).unwrap_or(u32::MAX),
            max_tokens,
        };
        let admitted = self.admit(tenant, &request).map_err(fail)?;
        if (prompt_tokens.len() as u64) >= u64::from(context) {
            self.release(tenant, admitted, 0);
            return Err(fail(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
                format!(
                    "the prompt is {} tokens; model {} holds {context}",
                    prompt_tokens.len(),
                    parsed.model
                ),
            )));
        }
        let job = Job {
            tenant: id.clone(),
            model: parsed.model.clone(),
            prompt_tokens,
            max_tokens,
            sampling: sampling_of(&parsed, model_text.worker_stops()),
            kv_block_quota: tenant.policy.kv_block_quota,
        };
        let ticket = match self.dispatcher.submit(job) {
            Ok(t) => t,
            Err(e) => {
                self.release(tenant, admitted, 0);
                return Err(fail(dispatch_error(&e)));
            }
        };
        // Random, so the id the client sees names its audit record and nothing else.
        let request_id = crate::audit::new_request_id();
        let record = self.audit.as_ref().map(|a| {
            a.start(
                RequestFacts {
                    tenant: &id,
                    model: &parsed.model,
                    body: &req.body,
                    source: req.peer.remote,
                    api_key,
                },
                request_id,
            )
        });
        let run = Run {
            app_metrics: self.metrics.clone(),
            record,
            tenant: id,
            model: parsed.model.clone(),
            kind,
            created: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            arrived,
            stream: parsed.stream,
            output: OutputText::new(model_text, &parsed.stop),
        };
        let completion_id = format!(
            "{}-{:032x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            request_id.0
        );
        let release = self.reservation(tenant, admitted);
        // Boxed: an async fn's future holds its callee's twice (rust-lang/rust#62958),
        // so every layer above doubled this one's ~5 KiB: 52 KiB per request in
        // the transport, allocated, copied and touched per request.
        Ok(Box::pin(run.respond(ticket, completion_id, release)).await)
    }

    /// The prompt's model text and tokens, once the checks that need no
    /// tokens passed: what would be refused anyway is refused before it is
    /// tokenized (a tokenizer's time grows with the prompt, on the shared runtime).
    fn tokenize(
        &self,
        tenant: &TenantState,
        parsed: &openai::CompletionRequest,
    ) -> Result<(Arc<ModelText>, Vec<u32>), ApiError> {
        admission::authorize_prompt(
            &tenant.policy,
            &parsed.model,
            parsed.prompt.content_bytes() as u64,
        )
        .map_err(|r| rejection_error(&r))?;
        let model_text = Arc::clone(self.texts.get(&parsed.model).unwrap_or(&self.builtin));
        let tokens = encode_prompt(&model_text, parsed)?;
        Ok((model_text, tokens))
    }

    /// Refuses new work while the audit ring is nearly full (503 `audit_backlog`).
    fn audit_gate(&self) -> Result<(), ApiError> {
        if self.audit.as_ref().is_some_and(AuditHook::behind) {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "audit_backlog",
                "the audit log is behind; no request is served unrecorded, try again shortly",
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        Ok(())
    }

    /// Authorize and limit: the core's admission under the tenant's limiter.
    fn admit(
        &self,
        tenant: &TenantState,
        request: &AdmissionRequest<'_>,
    ) -> Result<bulkhead_core::limits::Admitted, ApiError> {
        let queued = QueueState {
            queued: self.dispatcher.queued_for(&tenant.policy.id),
        };
        let mut limiter = tenant
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        admission::admit(self.now(), &tenant.policy, &mut limiter, queued, request)
            .map_err(|r| rejection_error(&r))
    }

    /// The admitted request's reservation, given back (with the tokens used) when dropped.
    fn reservation(
        &self,
        tenant: &TenantState,
        admitted: bulkhead_core::limits::Admitted,
    ) -> ReleaseOnDrop {
        ReleaseOnDrop {
            limiter: tenant.limiter.clone(),
            epoch: self.epoch,
            admitted: Some(admitted),
            used: 0,
        }
    }

    fn release(&self, tenant: &TenantState, admitted: bulkhead_core::limits::Admitted, used: u64) {
        let mut reservation = self.reservation(tenant, admitted);
        reservation.used = used;
        drop(reservation); // gives it back now
    }
}

impl Policy {
    /// The policy of `config`'s tenants. A tenant already in `previous`
    /// keeps its limiter (reconfigured at `now` if its limits changed), so
    /// requests admitted before complete into it.
    fn build(
        config: Config,
        previous: &HashMap<TenantId, TenantState>,
        now: Timestamp,
    ) -> anyhow::Result<Self> {
        let mut tenants = HashMap::new();
        let mut keys = Vec::new();
        let mut reconfigure = Vec::new();
        for policy in &config.tenants {
            let fresh = admission::limiter_for(policy)
                .map_err(|e| anyhow::anyhow!("tenant {}: {e}", policy.id))?;
            let limiter = match previous.get(&policy.id) {
                Some(old) => {
                    if limits_differ(&old.policy, policy) {
                        reconfigure.push((old.limiter.clone(), fresh));
                    }
                    old.limiter.clone()
                }
                None => Arc::new(Mutex::new(fresh)),
            };
            keys.push(TenantApiKeys {
                tenant: policy.id.clone(),
                keys: policy.api_key_sha256.clone(),
                require_api_key: false,
            });
            tenants.insert(
                policy.id.clone(),
                TenantState {
                    policy: policy.clone(),
                    limiter,
                },
            );
        }
        let keys = ApiKeyRegistry::new(keys)?;
        // Only once nothing can fail any more.
        for (limiter, fresh) in reconfigure {
            limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .reconfigure(now, fresh);
        }
        Ok(Self {
            config,
            tenants,
            keys,
        })
    }
}

/// The API's error for a refusal of the core's admission.
fn rejection_error(r: &admission::Rejection) -> ApiError {
    let status = StatusCode::from_u16(r.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    let body = r.error_body();
    ApiError {
        status,
        kind: if status == StatusCode::TOO_MANY_REQUESTS {
            "rate_limit_error"
        } else {
            "invalid_request_error"
        },
        code: match status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
            StatusCode::FORBIDDEN => "model_not_found",
            StatusCode::PAYLOAD_TOO_LARGE => "prompt_too_large",
            _ => "invalid_value",
        },
        param: None,
        message: body["error"]["message"]
            .as_str()
            .unwrap_or("refused")
            .to_owned(),
        retry_after: r.retry_after_secs(),
    }
}

/// The prompt's tokens for its model; a prompt the model has no tokens or
/// template for is a 400 naming the parameter.
fn encode_prompt(
    model: &ModelText,
    parsed: &openai::CompletionRequest,
) -> Result<Vec<u32>, ApiError> {
    model.encode(&parsed.prompt).map_err(|message| {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_prompt",
            message,
        );
        e.param = Some(match parsed.kind {
            Kind::Chat => "messages",
            Kind::Text => "prompt",
        });
        e
    })
}

/// The worker's sampling parameters of a parsed request; its stop strings as byte tokens when the
/// model's workers find them (the built-in model), else none (the proxy
/// finds them in the text, [`OutputText`]).
fn sampling_of(parsed: &openai::CompletionRequest, worker_stops: bool) -> Sampling {
    Sampling {
        temperature: parsed.temperature,
        top_p: parsed.top_p,
        seed: parsed.seed,
        stop: if worker_stops {
            parsed
                .stop
                .iter()
                .map(|s| s.bytes().map(u32::from).collect())
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// Whether the limiter settings of two policies of one tenant differ.
fn limits_differ(a: &TenantPolicy, b: &TenantPolicy) -> bool {
    a.requests_per_second.to_bits() != b.requests_per_second.to_bits()
        || a.request_burst != b.request_burst
        || a.tokens_per_minute != b.tokens_per_minute
        || a.max_concurrent_requests != b.max_concurrent_requests
}

/// What a running request needs to answer.
struct Run {
    app_metrics: Arc<Metrics>,
    /// Its audit record, when the log is on.
    record: Option<Record>,
    tenant: TenantId,
    model: String,
    kind: Kind,
    created: u64,
    arrived: Instant,
    stream: bool,
    /// Its output as text.
    output: OutputText,
}

/// How a request ended, for the answer.
struct Outcome {
    text: String,
    reason: Option<FinishReason>,
    prompt_tokens: u32,
    output_tokens: u32,
    error: Option<String>,
}

impl Run {
    async fn respond(
        self,
        ticket: crate::dispatch::Ticket,
        id: String,
        release: ReleaseOnDrop,
    ) -> ApiResponse {
        if self.stream {
            self.respond_stream(ticket, id, release)
        } else {
            self.respond_whole(ticket, &id, release).await
        }
    }

    /// A whole JSON answer, once the request finished.
    async fn respond_whole(
        mut self,
        mut ticket: crate::dispatch::Ticket,
        id: &str,
        mut release: ReleaseOnDrop,
    ) -> ApiResponse {
        let mut out = Outcome {
            text: String::new(),
            reason: None,
            prompt_tokens: 0,
            output_tokens: 0,
            error: None,
        };
        let mut first = true;
        let mut finished = None;
        while let Some(event) = ticket.next().await {
            self.observe(&event, &mut first);
            match event {
                Event::Tokens { tokens, .. } => {
                    out.text.push_str(&self.output.push(&tokens));
                    if self.output.stop_request() {
                        ticket.stop();
                    }
                }
                Event::Finished(mut f) => {
                    f.reason = self.output.finish_reason(f.reason);
                    out.reason = Some(f.reason);
                    out.prompt_tokens = f.prompt_tokens;
                    out.output_tokens = f.output_tokens;
                    out.error.clone_from(&f.error);
                    finished = Some(f);
                }
                Event::Failed(why) => out.error = Some(why),
                Event::Violation(v) => {
                    if let Some(r) = &self.record {
                        r.violation(&v).await;
                    }
                }
                Event::Dispatched { .. } | Event::Rejected(_) => {}
            }
        }
        out.text.push_str(&self.output.finish());
        let record = self.record.take();
        release.used = u64::from(out.prompt_tokens) + u64::from(out.output_tokens);
        drop(release);
        self.app_metrics.tokens(
            &self.tenant,
            u64::from(out.prompt_tokens),
            u64::from(out.output_tokens),
        );
        if let Some(error) = out.error.clone().filter(|_| {
            out.reason != Some(FinishReason::Length) && out.reason != Some(FinishReason::Stop)
        }) {
            let e = ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                "worker_failed",
                error,
            );
            if let Some(mut r) = record {
                r.text(&out.text);
                if let Err(err) = r
                    .finish(502, Some("worker_failed"), finished.as_ref())
                    .await
                {
                    tracing::error!(tenant = %self.tenant, "the audit record of a failed request was not taken: {err}");
                }
            }
            self.app_metrics
                .request(Some(&self.tenant), e.status.as_u16());
            return e.response();
        }
        if let Some(mut r) = record {
            r.text(&out.text);
            if let Err(err) = r.finish(200, None, finished.as_ref()).await {
                return self.unrecorded(&err).response();
            }
        }
        self.app_metrics.request(Some(&self.tenant), 200);
        ApiResponse::full(StatusCode::OK, "application/json", self.whole(id, &out))
    }

    /// Server-sent events as tokens come; the task owns the ticket and the reservation.
    fn respond_stream(
        self,
        ticket: crate::dispatch::Ticket,
        id: String,
        release: ReleaseOnDrop,
    ) -> ApiResponse {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        // The stream outlives this call: it owns the ticket and the reservation.
        tokio::spawn(self.stream(ticket, id, release, tx));
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        ApiResponse {
            status: StatusCode::OK,
            headers,
            body: ResponseBody::Stream(rx),
        }
    }

    /// The stream's task: chunks until the request ends, then its audit
    /// record, then `[DONE]` (or an `error` event when something failed).
    async fn stream(
        mut self,
        mut ticket: crate::dispatch::Ticket,
        id: String,
        // Moved whole (not field by field) so its drop runs when the stream ends.
        mut release: ReleaseOnDrop,
        tx: mpsc::Sender<Bytes>,
    ) {
        let metrics = self.app_metrics.clone();
        let mut first = true;
        let mut sent_role = false;
        let error = |message: &str, code: &str| {
            sse(
                &json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}}),
            )
        };
        loop {
            let event = tokio::select! {
                e = ticket.next() => e,
                () = tx.closed() => break, // the client went away: the ticket's drop cancels
            };
            let Some(event) = event else { break };
            self.observe(&event, &mut first);
            let chunk = match event {
                Event::Tokens { tokens, .. } => {
                    let piece = self.output.push(&tokens);
                    if self.output.stop_request() {
                        ticket.stop();
                    }
                    if piece.is_empty() {
                        continue;
                    }
                    if let Some(r) = self.record.as_mut() {
                        r.text(&piece);
                    }
                    let c = self.delta(&id, &piece, !sent_role, None);
                    sent_role = true;
                    c
                }
                Event::Finished(mut f) => {
                    f.reason = self.output.finish_reason(f.reason);
                    let usage = (f.prompt_tokens, f.output_tokens);
                    release.used = u64::from(f.prompt_tokens) + u64::from(f.output_tokens);
                    metrics.tokens(&self.tenant, u64::from(usage.0), u64::from(usage.1));
                    if f.reason == FinishReason::Error || f.reason == FinishReason::Cancelled {
                        let msg = f
                            .error
                            .clone()
                            .unwrap_or_else(|| "the request was cancelled".to_owned());
                        self.close_record(502, Some("worker_failed"), Some(&f))
                            .await;
                        let _ = tx.send(error(&msg, "worker_failed")).await;
                        metrics.request(Some(&self.tenant), 502);
                        return;
                    }
                    let tail = self.output.finish();
                    if let Some(r) = self.record.as_mut() {
                        r.text(&tail);
                    }
                    if !tail.is_empty() {
                        let _ = tx.send(self.delta(&id, &tail, !sent_role, None)).await;
                    }
                    let _ = tx.send(self.delta(&id, "", false, Some(f.reason))).await;
                    let _ = tx.send(self.usage_chunk(&id, usage)).await;
                    // No [DONE] before the record is in the audit ring.
                    if let Some(r) = self.record.take()
                        && let Err(err) = r.finish(200, None, Some(&f)).await
                    {
                        let e = self.unrecorded(&err);
                        let _ = tx.send(error(&e.message, e.code)).await;
                        metrics.request(Some(&self.tenant), e.status.as_u16());
                        return;
                    }
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    metrics.request(Some(&self.tenant), 200);
                    return;
                }
                Event::Failed(why) => {
                    self.close_record(502, Some("worker_failed"), None).await;
                    let _ = tx.send(error(&why, "worker_failed")).await;
                    metrics.request(Some(&self.tenant), 502);
                    return;
                }
                Event::Violation(v) => {
                    if let Some(r) = &self.record {
                        r.violation(&v).await;
                    }
                    continue;
                }
                Event::Dispatched { .. } | Event::Rejected(_) => continue,
            };
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        // The client went away (or the dispatcher dropped the request).
        drop(ticket);
        self.close_record(499, Some("client_disconnected"), None)
            .await;
        metrics.request(Some(&self.tenant), 499);
    }

    /// Submits the record of a request that ended without an answer to withhold.
    async fn close_record(&mut self, status: u16, code: Option<&str>, finished: Option<&Finished>) {
        if let Some(r) = self.record.take()
            && let Err(err) = r.finish(status, code, finished).await
        {
            tracing::error!(tenant = %self.tenant, "the audit record of a request that ended with {status} was not taken: {err}");
        }
    }

    /// The error that replaces an answer whose audit record could not be taken.
    fn unrecorded(&self, err: &crate::audit::SubmitError) -> ApiError {
        tracing::error!(tenant = %self.tenant, "an answer was withheld: its audit record was not taken: {err}");
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "audit_unavailable",
            "the answer is withheld: its audit record could not be written; try again shortly",
        );
        e.retry_after = Some(1);
        e
    }

    fn observe(&mut self, event: &Event, first: &mut bool) {
        match event {
            Event::Dispatched { worker } => {
                self.app_metrics
                    .queue_time(&self.tenant, self.arrived.elapsed());
                if let Some(r) = self.record.as_mut() {
                    r.dispatched(*worker);
                }
            }
            Event::Tokens { .. } if *first => {
                *first = false;
                self.app_metrics.ttft(&self.tenant, self.arrived.elapsed());
                if let Some(r) = self.record.as_mut() {
                    r.first_token();
                }
            }
            _ => {}
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// The whole answer's JSON.
    fn whole(&self, id: &str, out: &Outcome) -> Vec<u8> {
        let reason = Some(out.reason.map_or("stop", FinishReason::as_openai_str));
        let choice = match self.kind {
            Kind::Chat => Choice::Message {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: &out.text,
                },
                logprobs: (),
                finish_reason: reason,
            },
            Kind::Text => Choice::Text {
                index: 0,
                text: &out.text,
                logprobs: (),
                finish_reason: reason,
            },
        };
        self.body(
            id,
            false,
            &[choice],
            Some(Usage::of(out.prompt_tokens, out.output_tokens)),
        )
    }

    /// One streamed chunk of `text` (with the role on the first), or the
    /// last one with its finish reason.
    fn delta(&self, id: &str, text: &str, role: bool, reason: Option<FinishReason>) -> Bytes {
        let finish_reason = reason.map(FinishReason::as_openai_str);
        let choice = match self.kind {
            Kind::Chat => Choice::Delta {
                index: 0,
                delta: match (role, reason) {
                    (_, Some(_)) => Delta::default(),
                    (true, None) => Delta {
                        role: Some("assistant"),
                        content: Some(text),
                    },
                    (false, None) => Delta {
                        role: None,
                        content: Some(text),
                    },
                },
                logprobs: (),
                finish_reason,
            },
            Kind::Text => Choice::Text {
                index: 0,
                text,
                logprobs: (),
                finish_reason,
            },
        };
        sse_bytes(&self.body(id, true, &[choice], None))
    }

    /// The streamed `usage` chunk (no choices).
    fn usage_chunk(&self, id: &str, (p, o): (u32, u32)) -> Bytes {
        sse_bytes(&self.body(id, true, &[], Some(Usage::of(p, o))))
    }

    fn body(&self, id: &str, chunk: bool, choices: &[Choice<'_>], usage: Option<Usage>) -> Vec<u8> {
        serde_json::to_vec(&Completion {
            id,
            object: self.object(chunk),
            created: self.created,
            model: &self.model,
            choices,
            usage,
        })
        .expect("plain structs serialize")
    }
}

/// A completion (or one chunk of it) as OpenAI's API writes it.
#[derive(serde::Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [Choice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Choice<'a> {
    Message {
        index: u32,
        message: Message<'a>,
        logprobs: (),
        finish_reason: Option<&'static str>,
    },
    Delta {
        index: u32,
        delta: Delta<'a>,
        logprobs: (),
        finish_reason: Option<&'static str>,
    },
    Text {
        index: u32,
        text: &'a str,
        logprobs: (),
        finish_reason: Option<&'static str>,
    },
}

#[derive(serde::Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Default, serde::Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(serde::Serialize)]
#[expect(
    clippy::struct_field_names,
    reason = "OpenAI's field names, serialized as they are"
)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl Usage {
    fn of(prompt: u32, output: u32) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: output,
            total_tokens: prompt + output,
        }
    }
}

/// `data: <json>\n\n`.
fn sse_bytes(json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Gives a streaming request's limiter reservation back when the stream
/// ends, however it ends (finished, failed, or the client went away), with
/// the tokens it actually used.
struct ReleaseOnDrop {
    limiter: Arc<Mutex<TenantLimiter>>,
    epoch: Instant,
    admitted: Option<bulkhead_core::limits::Admitted>,
    used: u64,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(admitted) = self.admitted.take() {
            let now = Timestamp::from_duration(self.epoch.elapsed());
            self.limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .complete(now, admitted, self.used);
        }
    }
}

/// The answer to a request the dispatcher could not queue.
fn dispatch_error(e: &DispatchError) -> ApiError {
    match e {
        DispatchError::QueueFull { .. } => {
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                e.to_string(),
            );
            err.retry_after = Some(1);
            err
        }
        DispatchError::UnknownTenant(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "permission_denied",
            e.to_string(),
        ),
        DispatchError::NoWorker(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_worker",
            e.to_string(),
        ),
    }
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

impl Handler for App {
    async fn handle(&self, req: ApiRequest) -> ApiResponse {
        crate::serve::busy_poll::activity(crate::serve::busy_poll::Activity::Request);
        let arrived = Instant::now();
        let route = (req.method.clone(), req.path.clone());
        let result = match (&route.0, route.1.as_str()) {
            (&Method::POST, "/v1/chat/completions") => {
                self.complete_recorded(req, Kind::Chat, arrived).await
            }
            (&Method::POST, "/v1/completions") => {
                self.complete_recorded(req, Kind::Text, arrived).await
            }
            (&Method::GET, "/v1/models") => {
                let policy = self.policy();
                match Self::authenticate(&policy, &req) {
                    Ok((t, _)) => Ok(Self::models(&policy, t)),
                    Err(e) => Err((None, e)),
                }
            }
            (&Method::GET, "/healthz") => Ok(self.health()),
            // A tenant sees its own series; the host's are on the admin endpoint.
            (&Method::GET, "/metrics") => {
                let policy = self.policy();
                match Self::authenticate(&policy, &req) {
                    Ok((t, _)) => Ok(ApiResponse::full(
                        StatusCode::OK,
                        "text/plain; version=0.0.4",
                        self.metrics
                            .render(Some(t.policy.id.as_str()), &self.kernel_counts()),
                    )),
                    Err(e) => Err((None, e)),
                }
            }
            (
                _,
                "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/healthz" | "/metrics",
            ) => Err((
                None,
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "invalid_request_error",
                    "method_not_allowed",
                    format!("{} is not allowed here", route.0),
                ),
            )),
            _ => Err((
                None,
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "unknown_url",
                    format!("unknown URL: {} {}", route.0, route.1),
                ),
            )),
        };
        match result {
            Ok(r) => r,
            Err((tenant, e)) => {
                self.metrics.request(tenant.as_ref(), e.status.as_u16());
                e.response()
            }
        }
    }
}
