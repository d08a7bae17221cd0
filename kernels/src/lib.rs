//! `bulkhead-kernels`: the worker engine.
//!
//! This crate will hold the paged KV cache whose blocks carry their owner
//! tenant, the CUDA kernels (`kernels/cuda/*.cu`, launched through cudarc)
//! with their CPU reference of identical guard semantics, the tiny built-in
//! model and the worker's continuous-batching engine (see
//! `docs/architecture.md`). It depends on `bulkhead-core` for tenant ids and
//! the proxy↔worker wire types. Nothing is implemented here yet.

#![forbid(unsafe_code)]
