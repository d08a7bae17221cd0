//! [`TokenBudget`]: tokens per minute, reserved at admission and settled at completion.
//!
//! A request's cost is unknown until it ends, but its ceiling is known at
//! admission: `prompt_tokens + max_tokens`. The budget takes the ceiling up
//! front ([`TokenBudget::reserve`]) and gives back what the request did not
//! use ([`TokenBudget::settle`]), so concurrent requests cannot overspend.

use super::{AcquireError, Gcra, Rate, RateError};
use crate::Timestamp;
/// A token-rate limiter with reservations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBudget {
    gcra: Gcra,
}

/// Tokens taken from a [`TokenBudget`] at admission, to be settled at completion.
///
/// Not `Clone`: settling consumes it, so it can be settled once only.
#[must_use = "a reservation holds tokens until it is settled with TokenBudget::settle"]
#[derive(Debug, PartialEq, Eq)]
pub struct Reservation {
    tokens: u64,
}

impl Reservation {
    /// Tokens reserved.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

impl TokenBudget {
    /// A full budget: `burst` tokens at once, refilling at `rate`.
    pub fn new(rate: Rate, burst: u64) -> Self {
        Self {
            gcra: Gcra::new(rate, burst),
        }
    }

    /// `tokens_per_minute`, with one minute's worth available at once.
    pub fn per_minute(tokens_per_minute: u64) -> Result<Self, RateError> {
        Ok(Self::new(
            Rate::per_minute(tokens_per_minute)?,
            tokens_per_minute,
        ))
    }

    /// `next` (a budget with new settings) owing the tokens this one owes at `now`.
    #[must_use]
    pub fn carry_into(&self, now: Timestamp, next: TokenBudget) -> TokenBudget {
        Self {
            gcra: self.gcra.carry_into(now, next.gcra),
        }
    }

    /// Whether `tokens` could be reserved at `now`, without reserving them.
    pub fn check(&self, now: Timestamp, tokens: u64) -> Result<(), AcquireError> {
        self.gcra.check(now, tokens)
    }

    /// Reserves `tokens` (the request's ceiling) at `now`.
    pub fn reserve(&mut self, now: Timestamp, tokens: u64) -> Result<Reservation, AcquireError> {
        self.gcra.try_acquire(now, tokens)?;
        Ok(Reservation { tokens })
    }

    /// Settles a reservation once `used` tokens are known, giving back the
    /// unused part; returns the tokens given back.
    ///
    /// Usage above the reservation is not charged (the reservation is the
    /// request's ceiling by construction): the refund is then zero. The
    /// budget never holds more than its burst afterwards.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "taking the reservation by value is the point: it cannot be settled twice"
    )]
    pub fn settle(&mut self, now: Timestamp, reservation: Reservation, used: u64) -> u64 {
        let unused = reservation.tokens.saturating_sub(used);
        self.gcra.refund(now, unused);
        unused
    }

    /// Whole tokens available at `now`.
    pub fn available(&self, now: Timestamp) -> u64 {
        self.gcra.available(now)
    }

    /// The most tokens available at once.
    pub fn burst(&self) -> u64 {
        self.gcra.burst()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn settling_returns_the_unused_part_only() {
        let mut b = TokenBudget::per_minute(6_000).unwrap();
        let t0 = Timestamp::ZERO;
        let r = b.reserve(t0, 5_000).unwrap();
        assert_eq!(b.available(t0), 1_000);
        let denied = b.reserve(t0, 2_000).unwrap_err();
        // 1000 tokens short at 100 tokens/s.
        assert_eq!(denied.retry_after(), Some(Duration::from_secs(10)));
        assert_eq!(b.settle(t0, r, 1_200), 3_800);
        assert_eq!(b.available(t0), 4_800);
    }

    #[test]
    fn overuse_refunds_nothing_and_late_refunds_stop_at_the_burst() {
        let mut b = TokenBudget::per_minute(600).unwrap();
        let r = b.reserve(Timestamp::ZERO, 100).unwrap();
        assert_eq!(b.settle(Timestamp::ZERO, r, 150), 0);
        assert_eq!(b.available(Timestamp::ZERO), 500);
        let r = b.reserve(Timestamp::ZERO, 500).unwrap();
        // 30 s later 300 tokens have come back; refunding all 500 stops at 600.
        let later = Timestamp::from_duration(Duration::from_secs(30));
        assert_eq!(b.settle(later, r, 0), 500);
        assert_eq!(b.available(later), 600);
    }
}
