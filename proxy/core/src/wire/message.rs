//! The messages: what the proxy tells a worker and what a worker reports back.
//!
//! Field order is part of the wire format (postcard is not self-describing):
//! reordering, inserting or retyping a field needs a new major
//! [`WIRE_VERSION`](super::WIRE_VERSION); appending an enum variant needs a
//! new minor one.

use super::{RequestId, WIRE_VERSION, WireError, is_compatible};
use crate::TenantId;
use serde::{Deserialize, Serialize};

/// The first message each side sends: who it is and what it speaks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's [`WIRE_VERSION`].
    pub version: u16,
    /// Which side the sender is, and a worker's resources.
    pub role: Role,
    /// The worker's id, as the proxy assigned it when it started the worker; the worker echoes it.
    pub worker_id: u32,
}

impl Hello {
    /// The proxy's hello to the worker it started as `worker_id`.
    pub const fn proxy(worker_id: u32) -> Self {
        Self {
            version: WIRE_VERSION,
            role: Role::Proxy,
            worker_id,
        }
    }

    /// A worker's hello: its id and what it can run.
    pub const fn worker(worker_id: u32, info: WorkerInfo) -> Self {
        Self {
            version: WIRE_VERSION,
            role: Role::Worker(info),
            worker_id,
        }
    }

    /// The proxy's check of a worker's answer: a compatible version, the
    /// worker role, and the id the proxy gave it; its resources if so.
    pub fn into_worker_info(self, expected_id: u32) -> Result<WorkerInfo, String> {
        self.check_version().map_err(|e| e.to_string())?;
        match self.role {
            Role::Worker(info) if self.worker_id == expected_id => Ok(info),
            Role::Worker(_) => Err(format!(
                "the worker answered as worker {}, not {expected_id}",
                self.worker_id
            )),
            Role::Proxy => Err("the peer is a proxy, not a worker".to_owned()),
        }
    }

    /// Checks that the peer who sent this hello speaks a compatible version.
    pub const fn check_version(&self) -> Result<(), WireError> {
        if is_compatible(self.version) {
            Ok(())
        } else {
            Err(WireError::VersionMismatch {
                ours: WIRE_VERSION,
                theirs: self.version,
            })
        }
    }
}

/// Which side of the connection sent a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The proxy, which dispatches requests.
    Proxy,
    /// A worker process, which runs them.
    Worker(WorkerInfo),
}

/// What a worker can run, sent once in its [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The compute backend running the model.
    pub backend: WorkerBackend,
    /// The models this worker serves, by the names requests use.
    pub models: Vec<String>,
    /// Most sequences it runs at once (its batch slots).
    pub max_slots: u32,
    /// KV cache blocks in its pool.
    pub total_blocks: u32,
    /// Tokens held by one KV block.
    pub block_tokens: u32,
}

/// The compute backend of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkerBackend {
    /// CUDA kernels on an NVIDIA GPU (or a MIG slice of one).
    Cuda,
    /// The CPU reference: same model, same KV guard semantics.
    Cpu,
    /// No math: a cost model of GPU step times over the real block pool and scheduler.
    Sim,
}

/// Proxy → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ProxyToWorker {
    /// The handshake; the first frame on the connection.
    Hello(Hello),
    /// Run a request.
    Submit(Submit),
    /// Stop a request; the worker still answers it with one [`Finished`] (reason
    /// [`FinishReason::Cancelled`], or how it ended if it already had).
    Cancel {
        /// The request to stop.
        request_id: RequestId,
    },
    /// Take no more requests, finish every running one with a [`Finished`], then close.
    Shutdown,
}

/// One request for a worker to run, already authorized and admitted by the proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Submit {
    /// The request's id; every report about it carries the same id.
    pub request_id: RequestId,
    /// The tenant the request belongs to: the owner of every KV block it gets.
    pub tenant: TenantId,
    /// The model to run, one of the worker's [`WorkerInfo::models`].
    pub model: String,
    /// The tokenized prompt.
    pub prompt_tokens: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// How to pick each next token.
    pub sampling: Sampling,
    /// Most KV blocks this tenant may hold on this worker (all its requests together).
    pub kv_block_quota: u32,
}

/// How a worker picks each next token.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Softmax temperature, finite and `>= 0`; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass, in `(0, 1]`; 1 disables it.
    pub top_p: f32,
    /// Seed of the sampler for reproducible output; `None` lets the worker pick.
    pub seed: Option<u64>,
    /// Token sequences that end generation when produced (not included in the output).
    pub stop: Vec<Vec<u32>>,
}

/// Worker → proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerToProxy {
    /// The handshake answer, with the worker's resources.
    Hello(Hello),
    /// Output tokens of a request, in order, batched per decode step or flush.
    ///
    /// One message type for one or many tokens: `first_index` lets the proxy
    /// check that nothing was lost or reordered.
    Tokens {
        /// The request they belong to.
        request_id: RequestId,
        /// Index of `tokens[0]` in the request's output (0 for the first output token).
        first_index: u32,
        /// The tokens, never empty.
        tokens: Vec<u32>,
    },
    /// A request ended; exactly one per [`Submit`], and the last message about it.
    Finished(Finished),
    /// Free resources, after every change (and in answer to nothing: the proxy never asks).
    Capacity(Capacity),
    /// The KV guard refused an access: the kernel wrote zeros instead, failing closed.
    Violation(Violation),
    /// The worker refused a frame or a request, with a typed reason (since 1.1).
    ///
    /// A refused [`Submit`] still gets its one [`Finished`] (reason
    /// [`FinishReason::Error`]) right after this; a malformed frame has no
    /// request id. The worker stays up and keeps the connection unless the
    /// framing itself broke.
    Rejected(Rejected),
}

/// A refusal: what was refused and why, never echoing request content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The refused request, when the refusal is about one.
    pub request_id: Option<RequestId>,
    /// Why.
    pub kind: RejectKind,
    /// Human-readable context (sizes, limits, names; never prompt content).
    pub detail: String,
}

/// Why a worker refused a frame or a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectKind {
    /// A frame whose payload is not a valid message (the frame was skipped).
    MalformedFrame,
    /// A frame the conversation does not allow here (e.g. no Hello first, a second Hello).
    ProtocolViolation,
    /// A model this worker does not serve.
    UnknownModel,
    /// A tenant this worker is not configured to serve.
    UnknownTenant,
    /// An empty prompt, or a token outside the model's vocabulary.
    InvalidPrompt,
    /// The prompt does not fit the model's context length.
    PromptTooLong,
    /// Sampling parameters out of range.
    InvalidSampling,
    /// The tenant's KV block quota cannot hold the request.
    QuotaExhausted,
    /// A request id already running or queued on this worker.
    DuplicateRequest,
    /// The worker is draining after a Shutdown.
    ShuttingDown,
}

/// How and at what cost a request ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    /// The request.
    pub request_id: RequestId,
    /// Why it ended.
    pub reason: FinishReason,
    /// Prompt tokens it was charged for (prefilled, including prefix-cache hits).
    pub prompt_tokens: u32,
    /// Output tokens it produced (the sum of its [`WorkerToProxy::Tokens`]).
    pub output_tokens: u32,
    /// Prompt tokens served from the tenant's own prefix cache instead of prefilled.
    pub prefix_cache_hit_tokens: u32,
    /// What went wrong, for [`FinishReason::Error`]; `None` otherwise.
    pub error: Option<String>,
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token or a stop sequence.
    Stop,
    /// It reached `max_tokens` (or the model's context length).
    Length,
    /// The proxy cancelled it, or the worker shut down.
    Cancelled,
    /// The worker failed it (see [`Finished::error`]); a KV guard violation ends here too.
    Error,
}

impl FinishReason {
    /// The OpenAI-compatible `finish_reason` string.
    pub const fn as_openai_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Error => "error",
        }
    }
}

/// A worker's free resources and each tenant's KV blocks against its quota.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Batch slots free for new sequences.
    pub free_slots: u32,
    /// KV blocks free (scrubbed and unowned).
    pub free_blocks: u32,
    /// Every tenant holding blocks on this worker.
    pub per_tenant: Vec<TenantBlocks>,
}

/// One tenant's KV blocks on a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantBlocks {
    /// The tenant.
    pub tenant: TenantId,
    /// Blocks it holds now (running sequences and its prefix cache).
    pub used_blocks: u32,
    /// Most it may hold: the largest `kv_block_quota` of its submits.
    pub quota: u32,
}

/// A KV guard violation: an access the guard refused (the access read or wrote zeros instead).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// The request whose sequence made the access.
    pub request_id: RequestId,
    /// That request's tenant.
    pub tenant: TenantId,
    /// What kind of access was refused.
    pub kind: ViolationKind,
    /// The KV block index involved.
    pub block: u32,
    /// Human-readable context for the audit record (never another tenant's data).
    pub detail: String,
}

/// What kind of access the KV guard refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ViolationKind {
    /// A read of a block owned by another tenant.
    CrossTenantRead,
    /// A write to a block owned by another tenant.
    CrossTenantWrite,
    /// A freed block handed out again before it was scrubbed.
    UnscrubbedReuse,
    /// A block index outside the pool, or a block owned by no one.
    InvalidBlock,
    /// An allocation past the tenant's `kv_block_quota`.
    QuotaExceeded,
}
