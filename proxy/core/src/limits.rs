//! Limits: exact, integer rate limiters driven by caller-supplied time.
//!
//! - [`Rate`]: an amount per duration, in integers.
//! - [`Gcra`]: a token bucket as one theoretical arrival time; its refusals
//!   carry the exact wait ([`Denied::retry_after`]).
//! - [`TokenBudget`]: tokens per minute, reserved at admission
//!   ([`Reservation`]) and settled at completion.
//! - [`ConcurrencyLimit`]: requests in flight, each holding a [`Permit`].
//! - [`TenantLimiter`]: the three together for one tenant, all or nothing.
//!
//! Nothing here reads a clock: every operation takes `now` as a
//! [`Timestamp`](crate::Timestamp), so tests are exact and never sleep.

mod concurrency;
mod gcra;
mod rate;
mod tenant_limiter;
mod token_budget;

pub use self::{
    concurrency::{ConcurrencyFull, ConcurrencyLimit, Permit},
    gcra::{AcquireError, Denied, Gcra},
    rate::{MAX_RATE_COMPONENT, Rate, RateError},
    tenant_limiter::{Admitted, LimitConfigError, LimitExceeded, LimitKind, TenantLimiter},
    token_budget::{Reservation, TokenBudget},
};
