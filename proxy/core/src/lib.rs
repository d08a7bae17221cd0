//! `bulkhead-core`: the sans-IO heart of bulkhead.
//!
//! Everything here is a deterministic function of its inputs: no sockets, no
//! threads, no clock. Time arrives as a [`Timestamp`] argument, so the proxy,
//! the seeded simulation and the property tests drive the same code.
//!
//! The request path this crate decides on (see `docs/architecture.md`):
//!
//! ```text
//! authenticate (identity) → authorize + limit (admission, limits)
//!   → enqueue (fair_queue) → dispatch (wire) → charge as tokens are produced
//! ```

#![forbid(unsafe_code)]

pub mod admission;
pub mod audit;
pub mod config;
pub mod fair_queue;
pub mod identity;
pub mod limits;
pub mod sim;
mod tenant;
mod time;
pub mod wire;

pub use self::{
    tenant::{IsolationLevel, MAX_TENANT_ID_LEN, TenantId, TenantIdError, Tier},
    time::Timestamp,
};
