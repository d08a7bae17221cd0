//! [`TenantLimiter`]: one tenant's request rate, token budget and concurrency, admitted together.

use super::{
    AcquireError, ConcurrencyLimit, Gcra, Permit, Rate, RateError, Reservation, TokenBudget,
};
use crate::Timestamp;
use std::fmt;
use std::time::Duration;

/// A tenant's limits, checked and taken all at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantLimiter {
    requests: Gcra,
    tokens: TokenBudget,
    concurrency: ConcurrencyLimit,
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Requests per second.
    RequestRate,
    /// Tokens per minute.
    TokenRate,
    /// Requests in flight.
    Concurrency,
    /// The request alone needs more tokens than a full minute's budget: it can never be admitted.
    RequestTooLarge,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RequestRate => "request rate",
            Self::TokenRate => "token rate",
            Self::Concurrency => "concurrency",
            Self::RequestTooLarge => "request size",
        })
    }
}

/// A request refused by a [`TenantLimiter`]; nothing was taken from any limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} limit exceeded{}", RetryHint(*.retry_after))]
pub struct LimitExceeded {
    /// The limit that refused.
    pub kind: LimitKind,
    /// The exact wait until that limit admits the request; `None` where no
    /// time can be known (concurrency) or waiting cannot help (too large).
    pub retry_after: Option<Duration>,
}

struct RetryHint(Option<Duration>);

impl fmt::Display for RetryHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, "; retry after {d:?}"),
            None => Ok(()),
        }
    }
}

/// Why a [`TenantLimiter`] cannot be built from the numbers given.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum LimitConfigError {
    /// `requests_per_second` is not a usable rate.
    #[error("requests_per_second: {0}")]
    RequestRate(RateError),
    /// `tokens_per_minute` is not a usable rate (zero or above 2^63).
    #[error("tokens_per_minute: {0}")]
    TokenRate(RateError),
    /// `request_burst` is zero: no request could ever be admitted.
    #[error("request_burst must be at least 1")]
    ZeroRequestBurst,
    /// `max_concurrent` is zero: no request could ever be admitted.
    #[error("max_concurrent must be at least 1")]
    ZeroMaxConcurrent,
}

/// An admitted request's hold on its tenant's limits; hand it to [`TenantLimiter::complete`].
#[must_use = "an admitted request holds a concurrency slot and reserved tokens until completed"]
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    reservation: Reservation,
    permit: Permit,
}

impl Admitted {
    /// Tokens reserved for the request.
    pub fn reserved_tokens(&self) -> u64 {
        self.reservation.tokens()
    }
}

impl TenantLimiter {
    /// Limits from plain numbers, as the tenant config states them. The token
    /// budget holds one minute's worth at most; every limit starts full.
    pub fn new(
        requests_per_second: f64,
        request_burst: u32,
        tokens_per_minute: u64,
        max_concurrent: u32,
    ) -> Result<Self, LimitConfigError> {
        let request_rate =
            Rate::per_second_f64(requests_per_second).map_err(LimitConfigError::RequestRate)?;
        if request_burst == 0 {
            return Err(LimitConfigError::ZeroRequestBurst);
        }
        if max_concurrent == 0 {
            return Err(LimitConfigError::ZeroMaxConcurrent);
        }
        Ok(Self {
            requests: Gcra::new(request_rate, u64::from(request_burst)),
            tokens: TokenBudget::per_minute(tokens_per_minute)
                .map_err(LimitConfigError::TokenRate)?,
            concurrency: ConcurrencyLimit::new(max_concurrent),
        })
    }

    /// Whether a request of `tokens` (prompt + `max_tokens`) would be admitted
    /// at `now`, taking nothing.
    ///
    /// When both rates refuse, the longer wait is reported (the request cannot
    /// pass before it); a full concurrency limit is reported when no rate
    /// refuses, since it has no known end.
    pub fn would_admit(&self, now: Timestamp, tokens: u64) -> Result<(), LimitExceeded> {
        let token_check = self.tokens.check(now, tokens);
        if let Err(AcquireError::ExceedsBurst { .. }) = token_check {
            return Err(LimitExceeded {
                kind: LimitKind::RequestTooLarge,
                retry_after: None,
            });
        }
        let refusals = [
            (LimitKind::RequestRate, self.requests.check(now, 1)),
            (LimitKind::TokenRate, token_check),
        ];
        if let Some(worst) = refusals
            .into_iter()
            .filter_map(|(kind, r)| r.err().map(|e| (kind, e.retry_after())))
            .max_by_key(|(_, wait)| *wait)
        {
            return Err(LimitExceeded {
                kind: worst.0,
                retry_after: worst.1,
            });
        }
        if !self.concurrency.has_room() {
            return Err(LimitExceeded {
                kind: LimitKind::Concurrency,
                retry_after: None,
            });
        }
        Ok(())
    }

    /// Admits a request of `tokens` (prompt + `max_tokens`) at `now`, all or
    /// nothing: one request cell, the tokens and a concurrency slot are taken
    /// together, or none of them is.
    pub fn check(&mut self, now: Timestamp, tokens: u64) -> Result<Admitted, LimitExceeded> {
        self.would_admit(now, tokens)?;
        self.requests
            .try_acquire(now, 1)
            .expect("request rate checked just above");
        let reservation = self
            .tokens
            .reserve(now, tokens)
            .expect("token budget checked just above");
        let permit = self
            .concurrency
            .try_acquire()
            .expect("concurrency checked just above");
        Ok(Admitted {
            reservation,
            permit,
        })
    }

    /// Ends an admitted request that used `used_tokens`: frees its slot and
    /// gives back the unused part of its reservation. Returns the tokens given back.
    pub fn complete(&mut self, now: Timestamp, admitted: Admitted, used_tokens: u64) -> u64 {
        let Admitted {
            reservation,
            permit,
        } = admitted;
        self.concurrency.release(permit);
        self.tokens.settle(now, reservation, used_tokens)
    }

    /// Takes the settings of `next` (a new config's limiter) at `now`,
    /// keeping what this one has used: requests and tokens taken and not yet
    /// regained stay taken (capped at the new bursts), and requests in
    /// flight stay in flight and are completed here as before.
    pub fn reconfigure(&mut self, now: Timestamp, next: TenantLimiter) {
        self.requests = self.requests.carry_into(now, next.requests);
        self.tokens = self.tokens.carry_into(now, next.tokens);
        self.concurrency = self.concurrency.resized(next.concurrency.max());
    }

    /// Requests that could start at `now` by the request rate alone.
    pub fn available_requests(&self, now: Timestamp) -> u64 {
        self.requests.available(now)
    }

    /// Tokens that could be reserved at `now`.
    pub fn available_tokens(&self, now: Timestamp) -> u64 {
        self.tokens.available(now)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.concurrency.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_ms(ms: u64) -> Timestamp {
        Timestamp::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn reconfiguring_keeps_what_was_used_and_completes_old_requests() {
        let mut l = TenantLimiter::new(10.0, 4, 6000, 3).unwrap();
        let a = l.check(at_ms(0), 1000).unwrap();
        let b = l.check(at_ms(0), 1000).unwrap();
        let _c = l.check(at_ms(0), 1000).unwrap();
        assert_eq!(l.available_requests(at_ms(0)), 1);
        // Raise the burst to 10 and the tokens to 12k/min, lower concurrency to 2.
        l.reconfigure(at_ms(0), TenantLimiter::new(10.0, 10, 12_000, 2).unwrap());
        // Three requests stay used against the bigger burst: not refilled.
        assert_eq!(l.available_requests(at_ms(0)), 7);
        assert_eq!(l.available_tokens(at_ms(0)), 9000);
        // Three in flight over a limit of two: nothing new passes.
        assert_eq!(l.in_flight(), 3);
        assert_eq!(
            l.check(at_ms(0), 10).unwrap_err().kind,
            LimitKind::Concurrency
        );
        // Requests admitted before the change complete into the new limits.
        l.complete(at_ms(0), a, 100);
        l.complete(at_ms(0), b, 100);
        assert_eq!(l.in_flight(), 1);
        assert_eq!(l.available_tokens(at_ms(0)), 9000 + 1800);
        let _d = l.check(at_ms(0), 10).unwrap();
        // Shrinking the burst below what is used leaves it empty, not negative.
        l.reconfigure(at_ms(0), TenantLimiter::new(10.0, 2, 600, 2).unwrap());
        assert_eq!(l.available_requests(at_ms(0)), 0);
        assert_eq!(l.available_tokens(at_ms(0)), 0);
        // ... and it refills at the new rate: 10/s is one request per 100 ms.
        assert_eq!(l.available_requests(at_ms(100)), 1);
    }

    #[test]
    fn a_token_refusal_takes_no_request_cell() {
        let mut l = TenantLimiter::new(10.0, 2, 600, 8).unwrap();
        let a = l.check(at_ms(0), 500).unwrap();
        let before = l.clone();
        let refused = l.check(at_ms(0), 200).unwrap_err();
        // 100 tokens short at 10 tokens/s.
        assert_eq!(
            refused,
            LimitExceeded {
                kind: LimitKind::TokenRate,
                retry_after: Some(Duration::from_secs(10)),
            }
        );
        assert_eq!(l, before);
        assert_eq!(l.available_requests(at_ms(0)), 1);
        assert_eq!(l.complete(at_ms(0), a, 100), 400);
        l.check(at_ms(0), 200)
            .map(|b| l.complete(at_ms(0), b, 0))
            .unwrap();
    }

    #[test]
    fn reports_the_longest_rate_wait_then_concurrency() {
        let mut l = TenantLimiter::new(1.0, 1, 60, 1).unwrap();
        let a = l.check(at_ms(0), 60).unwrap();
        let e = l.would_admit(at_ms(0), 30).unwrap_err();
        assert_eq!(
            (e.kind, e.retry_after),
            (LimitKind::TokenRate, Some(Duration::from_secs(30)))
        );
        assert_eq!(e.to_string(), "token rate limit exceeded; retry after 30s");
        let e = l.would_admit(at_ms(60_000), 1).unwrap_err();
        assert_eq!((e.kind, e.retry_after), (LimitKind::Concurrency, None));
        assert_eq!(e.to_string(), "concurrency limit exceeded");
        assert_eq!(l.complete(at_ms(60_000), a, 60), 0);
        assert_eq!(
            l.would_admit(at_ms(60_000), 61).unwrap_err().kind,
            LimitKind::RequestTooLarge
        );
        assert!(l.would_admit(at_ms(60_000), 60).is_ok());
    }

    #[test]
    fn rejects_limits_that_could_never_admit() {
        assert!(matches!(
            TenantLimiter::new(f64::NAN, 1, 1, 1),
            Err(LimitConfigError::RequestRate(RateError::NotPositive(_)))
        ));
        assert_eq!(
            TenantLimiter::new(1.0, 0, 1, 1),
            Err(LimitConfigError::ZeroRequestBurst)
        );
        assert_eq!(
            TenantLimiter::new(1.0, 1, 0, 1),
            Err(LimitConfigError::TokenRate(RateError::ZeroAmount))
        );
        assert_eq!(
            TenantLimiter::new(1.0, 1, 1, 0),
            Err(LimitConfigError::ZeroMaxConcurrent)
        );
    }
}
