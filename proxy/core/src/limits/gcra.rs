//! [`Gcra`]: the Generic Cell Rate Algorithm, in exact integer arithmetic.
//!
//! A GCRA is a token bucket kept as a single number, the *theoretical arrival
//! time* (TAT): the instant at which the bucket would be full again. A
//! request for `n` cells is admitted when, after adding `n` emission
//! intervals to the TAT, the TAT is at most `burst` intervals ahead of now.
//!
//! Time is kept in *units* of `1 / amount` nanoseconds: a nanosecond is
//! `amount` units, so the emission interval (`per / amount` nanoseconds) is
//! exactly `per` units for every rate, and 3 per second drifts by nothing,
//! ever. Only the `retry_after` reported to callers is rounded, up, to the
//! nanosecond.

use super::Rate;
use crate::Timestamp;
use std::time::Duration;

/// A rate limiter: `rate` cells per period with up to `burst` cells at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gcra {
    rate: Rate,
    burst: u64,
    /// Units per nanosecond: the rate's amount, divided by gcd(amount, per).
    units_per_ns: u128,
    /// Units per cell (the emission interval): the period in nanoseconds, divided by the same gcd.
    units_per_cell: u128,
    /// Theoretical arrival time, in units since the epoch.
    tat: u128,
}

/// A refusal that can succeed later: exactly `retry_after` from the refused call.
///
/// Acquiring the same number of cells at `now + retry_after` succeeds (if
/// nothing else acquired in between), and one nanosecond earlier it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: retry after {retry_after:?}")]
pub struct Denied {
    /// How long until the request would be admitted.
    pub retry_after: Duration,
}

/// Why a [`Gcra`] refuses cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// Not now; later.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// More cells than the burst: this request can never be admitted.
    #[error("{requested} cells requested but the burst is {burst}: can never be admitted")]
    ExceedsBurst {
        /// Cells requested.
        requested: u64,
        /// The limiter's burst.
        burst: u64,
    },
}

impl AcquireError {
    /// How long to wait before retrying, `None` if retrying can never succeed.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Denied(d) => Some(d.retry_after),
            Self::ExceedsBurst { .. } => None,
        }
    }
}

impl Gcra {
    /// A full limiter: `burst` cells available at once, refilling at `rate`.
    ///
    /// A burst of zero admits nothing but requests for zero cells.
    pub fn new(rate: Rate, burst: u64) -> Self {
        let (amount, per) = (rate.amount(), rate.per_nanos());
        let g = gcd(amount, per);
        Self {
            rate,
            burst,
            units_per_ns: u128::from(amount / g),
            units_per_cell: u128::from(per / g),
            tat: 0,
        }
    }

    /// The refill rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// The most cells available at once.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Whether `n` cells could be acquired at `now`, without taking them.
    pub fn check(&self, now: Timestamp, n: u64) -> Result<(), AcquireError> {
        if n > self.burst {
            return Err(AcquireError::ExceedsBurst {
                requested: n,
                burst: self.burst,
            });
        }
        let now_u = self.units(now);
        if n == 0 || self.tat <= now_u {
            return Ok(());
        }
        // Admit iff max(tat, now) + n·cell ≤ now + burst·cell, i.e. (tat > now
        // here) iff tat − now ≤ (burst − n)·cell.
        let slack = u128::from(self.burst - n) * self.units_per_cell;
        if self.tat - now_u <= slack {
            return Ok(());
        }
        // The earliest t (ns) with t·units_per_ns ≥ tat − slack; > now because
        // tat − slack > now_u.
        let admit_at = (self.tat - slack).div_ceil(self.units_per_ns);
        Err(Denied {
            retry_after: duration_from_nanos(admit_at - u128::from(now.as_nanos())),
        }
        .into())
    }

    /// Takes `n` cells at `now`, or says exactly when that will be possible.
    pub fn try_acquire(&mut self, now: Timestamp, n: u64) -> Result<(), AcquireError> {
        self.check(now, n)?;
        if n > 0 {
            self.tat = self.tat.max(self.units(now)) + u128::from(n) * self.units_per_cell;
        }
        Ok(())
    }

    /// Whole cells available at `now` (at most the burst).
    pub fn available(&self, now: Timestamp) -> u64 {
        let now_u = self.units(now);
        if self.tat <= now_u {
            return self.burst;
        }
        let owed = (self.tat - now_u).div_ceil(self.units_per_cell);
        self.burst
            .saturating_sub(u64::try_from(owed).unwrap_or(u64::MAX))
    }

    /// Gives back `n` cells taken earlier (an unused reservation); the bucket
    /// never holds more than its burst afterwards.
    pub fn refund(&mut self, now: Timestamp, n: u64) {
        let now_u = self.units(now);
        if self.tat > now_u {
            let back = u128::from(n) * self.units_per_cell;
            self.tat = self.tat.saturating_sub(back).max(now_u);
        }
    }

    /// `next` (a limiter with new settings) owing what this one owes at
    /// `now`: the cells taken and not yet regained carry over, capped at
    /// `next`'s burst, so changing a limit neither refills nor empties it.
    #[must_use]
    pub fn carry_into(&self, now: Timestamp, mut next: Gcra) -> Gcra {
        let owed = (self.burst - self.available(now)).min(next.burst);
        next.tat = next.units(now) + u128::from(owed) * next.units_per_cell;
        next
    }

    fn units(&self, now: Timestamp) -> u128 {
        u128::from(now.as_nanos()) * self.units_per_ns
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        Ok(secs) => Duration::new(
            secs,
            u32::try_from(nanos % NANOS_PER_SEC).expect("below 10^9"),
        ),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn at_ms(ms: u64) -> Timestamp {
        Timestamp::from_nanos(ms * MS)
    }

    #[test]
    fn ten_per_second_burst_five_waits_100ms_after_the_burst() {
        let mut g = Gcra::new(Rate::per_second(10).unwrap(), 5);
        for _ in 0..5 {
            g.try_acquire(at_ms(0), 1).unwrap();
        }
        assert_eq!(g.available(at_ms(0)), 0);
        let denied = g.try_acquire(at_ms(0), 1).unwrap_err();
        assert_eq!(denied.retry_after(), Some(Duration::from_millis(100)));
        // Two cells need two intervals; 30 ms in, 170 ms remain.
        assert_eq!(
            g.check(at_ms(30), 2).unwrap_err().retry_after(),
            Some(Duration::from_millis(170))
        );
        assert!(g.check(Timestamp::from_nanos(100 * MS - 1), 1).is_err());
        g.try_acquire(at_ms(100), 1).unwrap();
        assert_eq!(g.available(at_ms(600)), 5);
    }

    #[test]
    fn three_per_second_is_exact_over_a_long_run() {
        let mut g = Gcra::new(Rate::per_second(3).unwrap(), 2);
        let mut now = Timestamp::ZERO;
        g.try_acquire(now, 2).unwrap();
        for k in 1..=3_000_u64 {
            let wait = g.try_acquire(now, 1).unwrap_err().retry_after().unwrap();
            now = now + wait;
            // The k-th cell after the burst is due at k/3 s, rounded up to the ns.
            assert_eq!(now.as_nanos(), (k * 1_000_000_000).div_ceil(3));
            g.try_acquire(now, 1).unwrap();
        }
        assert_eq!(now, Timestamp::from_nanos(1_000_000_000_000));
    }

    #[test]
    fn more_than_the_burst_can_never_succeed() {
        let mut g = Gcra::new(Rate::per_second(10).unwrap(), 5);
        assert_eq!(
            g.try_acquire(at_ms(0), 6),
            Err(AcquireError::ExceedsBurst {
                requested: 6,
                burst: 5
            })
        );
        assert_eq!(g.available(at_ms(0)), 5, "a refusal takes nothing");
        assert_eq!(g.try_acquire(at_ms(0), 0), Ok(()));
    }

    #[test]
    fn refunds_never_fill_past_the_burst() {
        let mut g = Gcra::new(Rate::per_second(10).unwrap(), 5);
        g.try_acquire(at_ms(0), 4).unwrap();
        g.refund(at_ms(0), 2);
        assert_eq!(g.available(at_ms(0)), 3);
        g.refund(at_ms(0), 100);
        assert_eq!(g.available(at_ms(0)), 5);
        g.refund(at_ms(10), 100);
        assert_eq!(g.available(at_ms(10)), 5);
    }

    #[test]
    fn slow_float_rates_stay_exact() {
        // 0.5/s = 500 per 1000 s: one cell every 2 s.
        let mut g = Gcra::new(Rate::per_second_f64(0.5).unwrap(), 1);
        g.try_acquire(at_ms(0), 1).unwrap();
        assert_eq!(
            g.try_acquire(at_ms(500), 1).unwrap_err().retry_after(),
            Some(Duration::from_millis(1_500))
        );
    }
}
