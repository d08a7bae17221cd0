//! The audit phase of a request: one record per completion request of a
//! known tenant, handed to the audit ring before the answer is complete.
//!
//! - An admitted request's record is submitted when it ends, however it
//!   ends: before a whole answer is returned, before a stream's `[DONE]`,
//!   when the worker fails, when the client goes away. If the record cannot
//!   enter the ring, the answer is withheld (503, or an `error` event in
//!   place of `[DONE]`): no request is reported complete without its record.
//! - A request refused after authentication (400, 403, 413, 429, 503) has a
//!   record too, with its status and error code.
//! - Content is never stored: `prompt_digest` is the HMAC-SHA-256 of the
//!   request body as received, `response_digest` of the completion text as
//!   answered, both under the tenant's digest key (so a short prompt cannot
//!   be confirmed by hashing guesses). `api_key_prefix` is the key's
//!   non-secret id (8 hex digits of its SHA-256), never a part of the key.
//! - When the ring is 90% full, new requests are refused (503
//!   `audit_backlog`): the service degrades visibly, never the log.

use crate::{
    audit::{
        AuditCounters, AuditKeys, AuditSink, NotTaken, SubmitError, new_request_id, unix_now_ns,
    },
    transport::{FlowTransport, Refusal, RefusalSink},
};
use bulkhead_core::{
    TenantId,
    audit::{
        AuditEvent, ConnectionRefused, ContentHasher, EventKind, GuardViolation, RequestEvent,
    },
    identity::ApiKeyId,
    wire::{Finished, RequestId, Violation},
};
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::Notify;

/// How long a finished request waits for room in a full ring before its
/// answer is withheld.
const RECORD_WAIT: Duration = Duration::from_secs(2);
/// How long a refusal's or a violation's record waits.
const SIDE_WAIT: Duration = Duration::from_millis(200);

/// The API's handle on the audit log: the ring and the tenants' digest keys.
#[derive(Clone, Debug)]
pub struct AuditHook {
    sink: AuditSink,
    keys: Arc<AuditKeys>,
    pending: Arc<Pending>,
}

/// Records of admitted requests not yet in the ring. A request's record
/// may outlive the transport's part of it: a stream's task submits it once
/// it sees its client gone, and a request aborted with its connection
/// submits it as its future is dropped, which the runtime does after the
/// listener has finished. A shutdown waits for these before it closes the
/// log ([`AuditHook::records_settled`]).
#[derive(Debug, Default)]
struct Pending {
    count: AtomicUsize,
    settled: Notify,
}

/// One record of [`Pending`], counted until dropped.
struct PendingGuard(Arc<Pending>);

impl PendingGuard {
    fn new(pending: &Arc<Pending>) -> Self {
        pending.count.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(pending))
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

impl AuditHook {
    /// Records go to `sink`; digests are keyed by `keys` (the writer's master key).
    pub fn new(sink: AuditSink, keys: Arc<AuditKeys>) -> Self {
        Self {
            sink,
            keys,
            pending: Arc::default(),
        }
    }

    /// Records of admitted requests started and not yet submitted (nor given up).
    pub fn pending_records(&self) -> usize {
        self.pending.count.load(Ordering::SeqCst)
    }

    /// Waits up to `limit` until every record started has been submitted
    /// (or given up, with an error logged); whether all have. A shutdown
    /// calls it after the listeners have stopped and before the log closes.
    pub async fn records_settled(&self, limit: Duration) -> bool {
        let all = async {
            loop {
                let settled = self.pending.settled.notified();
                if self.pending_records() == 0 {
                    return;
                }
                settled.await;
            }
        };
        tokio::time::timeout(limit, all).await.is_ok()
    }

    /// The ring's counters (for `/metrics`).
    pub fn counters(&self) -> AuditCounters {
        self.sink.counters()
    }

    /// Whether the ring is so full that new requests must be refused.
    pub(crate) fn behind(&self) -> bool {
        let c = self.sink.counters();
        c.ring_depth.saturating_mul(10) >= c.ring_capacity.saturating_mul(9)
    }

    /// A record for a request of `tenant` that starts now.
    pub(crate) fn start(&self, request: RequestFacts<'_>, request_id: RequestId) -> Record {
        Record {
            hook: self.clone(),
            time_unix_ns: unix_now_ns(),
            started: Instant::now(),
            open: Some((
                self.request_event(&request, request_id),
                self.keys.content_hasher(request.tenant),
            )),
            pending: Some(PendingGuard::new(&self.pending)),
        }
    }

    /// The record of a request refused with `status` and `code` (nothing ran).
    pub(crate) async fn refused(&self, request: RequestFacts<'_>, status: u16, code: &str) {
        let mut event = self.request_event(&request, new_request_id());
        event.status = status;
        event.error_code = Some(code.to_owned());
        event.response_digest = self.keys.content_hasher(request.tenant).finish();
        let event = AuditEvent {
            time_unix_ns: unix_now_ns(),
            kind: EventKind::Request(event),
        };
        if let Err(err) = self.submit(event, SIDE_WAIT).await {
            tracing::error!(tenant = %request.tenant, "the audit record of a refused request was not taken: {err}");
        }
    }

    /// Any other event (kernel drop counts, ...): into the ring, waiting for room if needed.
    pub(crate) async fn record(&self, event: AuditEvent) {
        let kind = event.kind.name();
        if let Err(err) = self.submit(event, RECORD_WAIT).await {
            tracing::error!("an audit record ({kind}) was not taken: {err}");
        }
    }

    /// The record of a KV guard violation worker `worker` reported.
    pub(crate) async fn violation(&self, violation: &Violation, worker: u32) {
        let event = AuditEvent {
            time_unix_ns: unix_now_ns(),
            kind: EventKind::GuardViolation(GuardViolation::from_wire(violation, worker)),
        };
        if let Err(err) = self.submit(event, RECORD_WAIT).await {
            tracing::error!(tenant = %violation.tenant, "the audit record of a KV guard violation was not taken: {err}");
        }
    }

    fn request_event(&self, request: &RequestFacts<'_>, request_id: RequestId) -> RequestEvent {
        RequestEvent {
            request_id,
            tenant: request.tenant.clone(),
            model: request.model.to_owned(),
            prompt_digest: self.keys.content_digest(request.tenant, request.body),
            response_digest: bulkhead_core::audit::ContentDigest([0; 32]),
            input_tokens: 0,
            output_tokens: 0,
            ttft_us: None,
            latency_us: 0,
            worker: None,
            rerouted: false,
            cache_hit: false,
            status: 0,
            error_code: None,
            source: Some(request.source),
            api_key_prefix: request.api_key.map(|k| k.to_string()),
        }
    }

    /// Into the ring: at once if there is room, else waiting up to `wait`
    /// off the async threads.
    async fn submit(&self, event: AuditEvent, wait: Duration) -> Result<(), SubmitError> {
        match self.sink.try_submit(event) {
            Ok(_) => Ok(()),
            Err(NotTaken::Full(event)) => {
                let sink = self.sink.clone();
                tokio::task::spawn_blocking(move || sink.submit(event, wait).map(|_| ()))
                    .await
                    .unwrap_or(Err(SubmitError::Closed))
            }
            Err(NotTaken::Closed) => Err(SubmitError::Closed),
        }
    }
}

/// What the audit needs to know of a request when it starts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestFacts<'a> {
    pub tenant: &'a TenantId,
    pub model: &'a str,
    pub body: &'a [u8],
    pub source: SocketAddr,
    pub api_key: Option<ApiKeyId>,
}

/// One admitted request's record, filled in as it runs.
///
/// Dropped without [`Record::finish`] (the client went away while a whole
/// answer was being computed, and the handler was dropped with it), it is
/// submitted as ended with 499 `client_disconnected`: every admitted request
/// leaves its record.
pub(crate) struct Record {
    hook: AuditHook,
    time_unix_ns: u64,
    started: Instant,
    /// `None` once submitted.
    open: Option<(RequestEvent, ContentHasher)>,
    /// Counts the record as pending until it is dropped (after its
    /// submission), or until the blocking submission of a drop ends.
    pending: Option<PendingGuard>,
}

impl Record {
    /// The request went to worker `worker`.
    pub fn dispatched(&mut self, worker: u32) {
        if let Some((event, _)) = self.open.as_mut() {
            event.rerouted = event.worker.is_some_and(|w| w != worker);
            event.worker = Some(worker);
        }
    }

    /// The first output token came.
    pub fn first_token(&mut self) {
        let elapsed = self.started.elapsed();
        if let Some((event, _)) = self.open.as_mut()
            && event.ttft_us.is_none()
        {
            event.ttft_us = Some(micros(elapsed));
        }
    }

    /// Completion text as answered (in order).
    pub fn text(&mut self, piece: &str) {
        if let Some((_, hasher)) = self.open.as_mut() {
            hasher.update(piece.as_bytes());
        }
    }

    /// A KV guard violation of this request.
    pub async fn violation(&self, violation: &Violation) {
        let worker = self
            .open
            .as_ref()
            .and_then(|(e, _)| e.worker)
            .unwrap_or(u32::MAX);
        self.hook.violation(violation, worker).await;
    }

    /// The request ended with `status` (and `code` when it failed): into
    /// the ring, before the answer may be reported complete.
    pub async fn finish(
        mut self,
        status: u16,
        code: Option<&str>,
        finished: Option<&Finished>,
    ) -> Result<(), SubmitError> {
        match self.close(status, code, finished) {
            Some(event) => self.hook.submit(event, RECORD_WAIT).await,
            None => Ok(()),
        }
    }

    /// The finished event, once.
    fn close(
        &mut self,
        status: u16,
        code: Option<&str>,
        finished: Option<&Finished>,
    ) -> Option<AuditEvent> {
        let (mut event, hasher) = self.open.take()?;
        event.status = status;
        event.error_code = code.map(str::to_owned);
        event.latency_us = micros(self.started.elapsed());
        if let Some(f) = finished {
            event.input_tokens = f.prompt_tokens;
            event.output_tokens = f.output_tokens;
            event.cache_hit = f.prefix_cache_hit_tokens > 0;
        }
        event.response_digest = hasher.finish();
        Some(AuditEvent {
            time_unix_ns: self.time_unix_ns,
            kind: EventKind::Request(event),
        })
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let Some(event) = self.close(499, Some("client_disconnected"), None) else {
            return;
        };
        // No waiting in a drop: at once if there is room, else on a blocking thread.
        let sink = self.hook.sink.clone();
        match sink.try_submit(event) {
            Ok(_) => {}
            Err(NotTaken::Full(event)) if tokio::runtime::Handle::try_current().is_ok() => {
                let pending = self.pending.take();
                tokio::task::spawn_blocking(move || {
                    if let Err(err) = sink.submit(event, RECORD_WAIT) {
                        tracing::error!(
                            "the audit record of an abandoned request was not taken: {err}"
                        );
                    }
                    drop(pending);
                });
            }
            Err(not_taken) => {
                let err = SubmitError::from(not_taken);
                tracing::error!("the audit record of an abandoned request was not taken: {err}");
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl RefusalSink for AuditHook {
    fn refused(
        &self,
        remote: SocketAddr,
        transport: FlowTransport,
        tenant: Option<&TenantId>,
        why: &Refusal,
    ) {
        let detail = match why {
            Refusal::Handshake(e) | Refusal::NoTenant(e) => format!(": {e}"),
            Refusal::HandshakeTimeout | Refusal::OverLimit => String::new(),
        };
        let over = match transport {
            FlowTransport::Tcp => "tcp",
            FlowTransport::Udp => "quic",
        };
        let event = AuditEvent {
            time_unix_ns: unix_now_ns(),
            kind: EventKind::ConnectionRefused(ConnectionRefused {
                tenant: tenant.cloned(),
                source: Some(remote),
                reason: format!("{over} {}{detail}", why.code()),
            }),
        };
        // A connection task: never block it; a full ring is counted by the sink.
        if let Err(err) = self.sink.submit(event, Duration::ZERO) {
            tracing::warn!(%remote, "the audit record of a refused connection was not taken: {err}");
        }
    }
}
