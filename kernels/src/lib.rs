//! `bulkhead-kernels`: the worker engine.
//!
//! - [`pool`]: the paged KV block pool. Every block carries its owner tenant's
//!   tag, tenants have quotas, freed blocks are scrubbed before another
//!   tenant can own them, and the prefix cache is keyed by (tenant, chain
//!   hash) so it is never shared across tenants.
//! - [`layout`]: the memory layouts every backend shares (KV cache, block
//!   tables, owner tags) and the guard's violation flags.
//! - [`model`]: the built-in Llama-architecture decoder (weights made from a
//!   seed), its byte-level tokenizer and the samplers.
//! - [`backend`]: the one trait the engine drives; [`cpu`] is the reference
//!   implementation, [`cuda`] runs the same math and guard on an NVIDIA GPU,
//!   [`sim`] runs no math and charges time from a cost model.
//! - [`engine`]: continuous batching with chunked prefill over the pool and a
//!   backend, sans-IO (time is passed in); the `bulkhead worker` process wraps it.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod layout;
pub mod model;
pub mod pool;
pub mod sim;
