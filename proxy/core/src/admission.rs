//! Admission: one decision per request, before it is queued.
//!
//! [`admit`] is a deterministic function of the tenant's policy, its limiter
//! state, its queue state and the request. It checks, in order, what the
//! request asks for against the tenant's policy (authorize), the tenant's
//! backlog (queue), and last the rate and concurrency limits (limit), which
//! are the only checks that consume anything: a request refused for any
//! reason leaves every budget as it was.
//!
//! A refusal is a typed [`Rejection`] that knows its HTTP status, its
//! `Retry-After` and its OpenAI-style error body, so the front door only
//! renders it.

use crate::Timestamp;
use crate::config::TenantPolicy;
use crate::limits::{Admitted, LimitConfigError, LimitExceeded, LimitKind, TenantLimiter};
use serde_json::json;
use std::time::Duration;

/// What admission needs to know about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionRequest<'a> {
    /// The model the request names.
    pub model: &'a str,
    /// Size of the prompt as received, in bytes.
    pub prompt_bytes: u64,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Tokens the request may generate.
    pub max_tokens: u32,
}

/// The tenant's queue as admission sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueState {
    /// Requests of the tenant queued now.
    pub queued: usize,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The tenant may not use this model (or it does not exist).
    #[error("model '{model}' is not available to this tenant")]
    ModelNotAllowed {
        /// The model asked for.
        model: String,
    },
    /// `max_tokens` is above the tenant's cap.
    #[error("max_tokens is {requested}, above this tenant's limit of {limit}")]
    MaxTokensTooLarge {
        /// What the request asked for.
        requested: u32,
        /// The tenant's cap.
        limit: u32,
    },
    /// `max_tokens` is zero.
    #[error("max_tokens must be at least 1")]
    MaxTokensZero,
    /// The prompt is larger than the tenant's cap.
    #[error("prompt is {bytes} bytes, above this tenant's limit of {limit}")]
    PromptTooLarge {
        /// The prompt's size.
        bytes: u64,
        /// The tenant's cap.
        limit: u64,
    },
    /// The request could never fit the tenant's token budget, however long it waited.
    #[error(
        "request needs {needed} tokens (prompt + max_tokens), more than this tenant's budget of {budget} per minute"
    )]
    ExceedsTokenBudget {
        /// Prompt plus `max_tokens`.
        needed: u64,
        /// Tokens per minute.
        budget: u64,
    },
    /// The tenant already has its maximum number of queued requests.
    #[error("too many queued requests: this tenant may queue {cap}")]
    QueueFull {
        /// The tenant's backlog cap.
        cap: u32,
    },
    /// A rate or concurrency limit refused the request for now.
    #[error("{}", rate_message(*.kind, *.retry_after))]
    RateLimited {
        /// Which limit.
        kind: LimitKind,
        /// When the same request would be admitted, if that is known.
        retry_after: Option<Duration>,
    },
}

fn rate_message(kind: LimitKind, retry_after: Option<Duration>) -> String {
    let what = match kind {
        LimitKind::RequestRate => "request rate limit reached",
        LimitKind::TokenRate => "token rate limit reached",
        LimitKind::Concurrency => "too many concurrent requests",
        LimitKind::RequestTooLarge => "request larger than the token budget",
    };
    match retry_after {
        Some(d) => format!("{what}; retry after {:.3} s", d.as_secs_f64()),
        None => format!("{what}; retry when one of your requests completes"),
    }
}

impl Rejection {
    /// The HTTP status the front door answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::ModelNotAllowed { .. } => 403,
            Self::MaxTokensTooLarge { .. }
            | Self::MaxTokensZero
            | Self::ExceedsTokenBudget { .. } => 400,
            Self::PromptTooLarge { .. } => 413,
            Self::QueueFull { .. } | Self::RateLimited { .. } => 429,
        }
    }

    /// The `Retry-After` value in whole seconds (rounded up), when one applies.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::RateLimited {
                retry_after: Some(d),
                ..
            } => Some(d.as_secs() + u64::from(d.subsec_nanos() > 0)),
            _ => None,
        }
    }

    /// OpenAI's error `type` and `code` for this refusal.
    fn openai_kind(&self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            Self::ModelNotAllowed { .. } => {
                ("invalid_request_error", "model_not_found", Some("model"))
            }
            Self::MaxTokensTooLarge { .. } | Self::MaxTokensZero => {
                ("invalid_request_error", "invalid_value", Some("max_tokens"))
            }
            Self::ExceedsTokenBudget { .. } => (
                "invalid_request_error",
                "context_length_exceeded",
                Some("max_tokens"),
            ),
            Self::PromptTooLarge { .. } => (
                "invalid_request_error",
                "prompt_too_large",
                Some("messages"),
            ),
            Self::QueueFull { .. } | Self::RateLimited { .. } => {
                ("rate_limit_error", "rate_limit_exceeded", None)
            }
        }
    }

    /// The OpenAI-style error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn error_body(&self) -> serde_json::Value {
        let (kind, code, param) = self.openai_kind();
        json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "param": param,
                "code": code,
            }
        })
    }
}

/// The checks of [`admit`] that need no token count: the model is allowed
/// and the prompt's content is within the tenant's bytes. The front door
/// runs them before it tokenizes a prompt, so a request that would be
/// refused anyway costs no tokenizing (a tokenizer's time grows with the
/// prompt); [`admit`] runs them again, with the rest.
pub fn authorize_prompt(
    policy: &TenantPolicy,
    model: &str,
    prompt_bytes: u64,
) -> Result<(), Rejection> {
    if !policy.allows_model(model) {
        return Err(Rejection::ModelNotAllowed {
            model: model.to_owned(),
        });
    }
    if prompt_bytes > policy.max_prompt_bytes {
        return Err(Rejection::PromptTooLarge {
            bytes: prompt_bytes,
            limit: policy.max_prompt_bytes,
        });
    }
    Ok(())
}

/// Decides on one request of the tenant `policy` describes.
///
/// On success the returned [`Admitted`] holds the reserved tokens
/// (prompt + `max_tokens`) and a concurrency slot; hand it back to
/// [`TenantLimiter::complete`] with the tokens actually used.
pub fn admit(
    now: Timestamp,
    policy: &TenantPolicy,
    limiter: &mut TenantLimiter,
    queue: QueueState,
    request: &AdmissionRequest<'_>,
) -> Result<Admitted, Rejection> {
    // authorize
    if !policy.allows_model(request.model) {
        return Err(Rejection::ModelNotAllowed {
            model: request.model.to_owned(),
        });
    }
    if request.max_tokens == 0 {
        return Err(Rejection::MaxTokensZero);
    }
    if request.max_tokens > policy.max_tokens_per_request {
        return Err(Rejection::MaxTokensTooLarge {
            requested: request.max_tokens,
            limit: policy.max_tokens_per_request,
        });
    }
    if request.prompt_bytes > policy.max_prompt_bytes {
        return Err(Rejection::PromptTooLarge {
            bytes: request.prompt_bytes,
            limit: policy.max_prompt_bytes,
        });
    }
    let needed = u64::from(request.prompt_tokens) + u64::from(request.max_tokens);
    if needed > policy.tokens_per_minute {
        return Err(Rejection::ExceedsTokenBudget {
            needed,
            budget: policy.tokens_per_minute,
        });
    }
    // queue
    if queue.queued >= policy.max_queued_requests as usize {
        return Err(Rejection::QueueFull {
            cap: policy.max_queued_requests,
        });
    }
    // limit: the only step that consumes anything, all or nothing.
    limiter
        .check(now, needed)
        .map_err(|LimitExceeded { kind, retry_after }| match kind {
            LimitKind::RequestTooLarge => Rejection::ExceedsTokenBudget {
                needed,
                budget: policy.tokens_per_minute,
            },
            _ => Rejection::RateLimited { kind, retry_after },
        })
}

/// The limiter a tenant's policy describes: requests/s with its burst,
/// tokens/minute (a minute's worth of burst) and concurrent requests.
pub fn limiter_for(policy: &TenantPolicy) -> Result<TenantLimiter, LimitConfigError> {
    TenantLimiter::new(
        policy.requests_per_second,
        policy.request_burst,
        policy.tokens_per_minute,
        policy.max_concurrent_requests,
    )
}

#[cfg(test)]
mod tests;
