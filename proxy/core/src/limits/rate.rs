//! [`Rate`]: an exact "amount per duration" in integers.

use std::fmt;
use std::time::Duration;

/// Largest `amount` (and largest `per`, in nanoseconds) a [`Rate`] accepts:
/// with both at most 2^63, every quantity a [`Gcra`](super::Gcra) keeps
/// (nanoseconds × amount, burst × period) fits in a `u128`.
pub const MAX_RATE_COMPONENT: u64 = 1 << 63;

/// An exact rate: `amount` cells every `per`, e.g. 10 per second or 3 per 7 s.
///
/// Kept as two integers so limiters built on it never accumulate rounding
/// error: 3 per second is exactly 3 per second, not 333 333 333 ns apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    amount: u64,
    per: Duration,
}

/// Why a [`Rate`] cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum RateError {
    /// The amount is zero: nothing would ever be admitted.
    #[error("rate amount must be at least 1")]
    ZeroAmount,
    /// The period is shorter than one nanosecond.
    #[error("rate period must be at least 1 ns")]
    ZeroPeriod,
    /// The amount or the period (in nanoseconds) is above [`MAX_RATE_COMPONENT`].
    #[error("rate amount and period must each be at most 2^63 (units, nanoseconds)")]
    OutOfRange,
    /// A float rate is NaN, infinite, zero or negative.
    #[error("rate {0} per second is not a finite positive number")]
    NotPositive(f64),
    /// A float rate rounds to less than 0.001 per second.
    #[error("rate {0} per second is below the resolution of 0.001 per second")]
    BelowResolution(f64),
}

impl Rate {
    /// `amount` cells every `per`.
    pub fn new(amount: u64, per: Duration) -> Result<Self, RateError> {
        if amount == 0 {
            return Err(RateError::ZeroAmount);
        }
        if per.is_zero() {
            return Err(RateError::ZeroPeriod);
        }
        if amount > MAX_RATE_COMPONENT || per.as_nanos() > u128::from(MAX_RATE_COMPONENT) {
            return Err(RateError::OutOfRange);
        }
        Ok(Self { amount, per })
    }

    /// `amount` cells every second.
    pub fn per_second(amount: u64) -> Result<Self, RateError> {
        Self::new(amount, Duration::from_secs(1))
    }

    /// `amount` cells every minute.
    pub fn per_minute(amount: u64) -> Result<Self, RateError> {
        Self::new(amount, Duration::from_mins(1))
    }

    /// A float rate per second, kept exactly to the thousandth: `x` per second
    /// becomes `round(x × 1000)` per 1000 s (2.5/s → 2500 per 1000 s).
    pub fn per_second_f64(x: f64) -> Result<Self, RateError> {
        if !x.is_finite() || x <= 0.0 {
            return Err(RateError::NotPositive(x));
        }
        let milli = (x * 1000.0).round();
        if milli < 1.0 {
            return Err(RateError::BelowResolution(x));
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "2^63 is exactly representable as f64"
        )]
        let max = MAX_RATE_COMPONENT as f64;
        if milli > max {
            return Err(RateError::OutOfRange);
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "milli is a whole number in [1, 2^63], checked above"
        )]
        let amount = milli as u64;
        Self::new(amount, Duration::from_secs(1000))
    }

    /// Cells per period.
    pub const fn amount(self) -> u64 {
        self.amount
    }

    /// The period.
    pub const fn per(self) -> Duration {
        self.per
    }

    /// The period in nanoseconds (at most [`MAX_RATE_COMPONENT`], checked at construction).
    pub(crate) fn per_nanos(self) -> u64 {
        u64::try_from(self.per.as_nanos()).expect("period checked at construction")
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {:?}", self.amount, self.per)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_rates_are_kept_to_the_thousandth() {
        let r = Rate::per_second_f64(2.5).unwrap();
        assert_eq!((r.amount(), r.per()), (2500, Duration::from_secs(1000)));
        let r = Rate::per_second_f64(0.0014).unwrap();
        assert_eq!(r.amount(), 1);
        assert_eq!(
            Rate::per_second_f64(0.0004),
            Err(RateError::BelowResolution(0.0004))
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                Rate::per_second_f64(bad),
                Err(RateError::NotPositive(_))
            ));
        }
        assert_eq!(Rate::per_second_f64(1e17), Err(RateError::OutOfRange));
    }

    #[test]
    fn rejects_degenerate_rates() {
        assert_eq!(Rate::per_second(0), Err(RateError::ZeroAmount));
        assert_eq!(Rate::new(1, Duration::ZERO), Err(RateError::ZeroPeriod));
        assert_eq!(
            Rate::new(1, Duration::from_secs(u64::MAX)),
            Err(RateError::OutOfRange)
        );
        assert_eq!(Rate::per_minute(6).unwrap().to_string(), "6 per 60s");
    }
}
