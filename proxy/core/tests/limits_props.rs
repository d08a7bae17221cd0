//! Property tests of the limiters: random operation sequences over random
//! time steps, checking after every step that a bucket never holds more than
//! its burst, that no window admits more than `burst + rate × window`, that
//! every `retry_after` is exact to the nanosecond, that refunds stay within
//! the burst and the reservation, and that a refusal takes nothing.

use bulkhead_core::Timestamp;
use bulkhead_core::limits::{
    AcquireError, Gcra, LimitKind, Rate, Reservation, TenantLimiter, TokenBudget,
};
use proptest::prelude::*;
use std::time::Duration;

const NS: Duration = Duration::from_nanos(1);

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    Acquire(u64),
    Refund(u64),
}

/// Time steps from "same instant" through "a few ns" to "seconds".
fn step() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(0_u64),
        2 => 1..1_000_u64,
        3 => 1..200_000_000_u64,
        1 => 1..5_000_000_000_u64,
    ]
}

fn gcra_op(burst: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => step().prop_map(Op::Advance),
        5 => (0..=burst + 2).prop_map(Op::Acquire),
        1 => (0..=burst + 2).prop_map(Op::Refund),
    ]
}

/// Integer rates (amount per ns period) and float rates per second.
fn rate() -> impl Strategy<Value = Rate> {
    prop_oneof![
        (1..1_000_u64, 1..5_000_000_000_u64).prop_map(|(amount, per)| Rate::new(
            amount,
            Duration::from_nanos(per)
        )
        .unwrap()),
        (0.001..5_000.0_f64).prop_map(|x| Rate::per_second_f64(x).unwrap()),
    ]
}

/// Asserts that `check(now + retry_after)` succeeds and one ns earlier fails.
fn assert_exact_retry(
    check: impl Fn(Timestamp) -> bool,
    now: Timestamp,
    retry_after: Duration,
) -> Result<(), TestCaseError> {
    prop_assert!(retry_after >= NS, "a refusal always waits");
    prop_assert!(check(now + retry_after), "refused at now + retry_after");
    prop_assert!(
        !check(now + retry_after.saturating_sub(NS)),
        "admitted 1 ns early"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gcra_holds_its_burst_its_rate_and_exact_retries(
        rate in rate(),
        burst in 0..20_u64,
        ops in (0..20_u64).prop_flat_map(|b| proptest::collection::vec(gcra_op(b), 1..200)),
    ) {
        let mut g = Gcra::new(rate, burst);
        let mut now = Timestamp::ZERO;
        // (time in ns, +cells acquired or −cells refunded)
        let mut events: Vec<(u64, i128)> = Vec::new();
        for op in ops {
            match op {
                Op::Advance(dt) => now = now + Duration::from_nanos(dt),
                Op::Acquire(n) => {
                    let before = g.clone();
                    match g.try_acquire(now, n) {
                        Ok(()) => events.push((now.as_nanos(), i128::from(n))),
                        Err(AcquireError::ExceedsBurst { requested, burst: b }) => {
                            prop_assert!(n > burst);
                            prop_assert_eq!((requested, b), (n, burst));
                            prop_assert_eq!(&g, &before, "a refusal takes nothing");
                        }
                        Err(AcquireError::Denied(d)) => {
                            prop_assert!(n <= burst && n > 0);
                            prop_assert_eq!(&g, &before, "a refusal takes nothing");
                            assert_exact_retry(|t| g.check(t, n).is_ok(), now, d.retry_after)?;
                        }
                    }
                }
                Op::Refund(n) => {
                    let available = g.available(now);
                    g.refund(now, n);
                    prop_assert!(g.available(now) <= available + n, "refund returned more than given");
                    events.push((now.as_nanos(), -i128::from(n)));
                }
            }
            prop_assert!(g.available(now) <= burst);
        }
        // Every window of consecutive events: net cells × per ≤ (burst × per) + (window × amount).
        let (amount, per) = (i128::from(rate.amount()), i128::try_from(rate.per().as_nanos()).unwrap());
        for i in 0..events.len() {
            let mut net = 0_i128;
            for j in i..events.len() {
                net += events[j].1;
                let window = i128::from(events[j].0 - events[i].0);
                prop_assert!(
                    net * per <= i128::from(burst) * per + window * amount,
                    "{net} cells in {window} ns at {rate} with burst {burst}"
                );
            }
        }
    }

    #[test]
    fn settling_refunds_at_most_the_reservation_and_never_past_the_burst(
        tokens_per_minute in 1..100_000_u64,
        ops in proptest::collection::vec((step(), 0..120_000_u64, 0..150_000_u64, any::<bool>()), 1..150),
    ) {
        let mut budget = TokenBudget::per_minute(tokens_per_minute).unwrap();
        let mut now = Timestamp::ZERO;
        let mut open: Vec<Reservation> = Vec::new();
        for (dt, want, used, settle) in ops {
            now = now + Duration::from_nanos(dt);
            if settle && !open.is_empty() {
                let r = open.swap_remove(usize::try_from(want).unwrap() % open.len());
                let reserved = r.tokens();
                let before = budget.available(now);
                let refunded = budget.settle(now, r, used);
                prop_assert_eq!(refunded, reserved.saturating_sub(used));
                prop_assert!(budget.available(now) <= before + refunded);
            } else {
                let before = budget.clone();
                match budget.reserve(now, want) {
                    Ok(r) => {
                        prop_assert_eq!(r.tokens(), want);
                        open.push(r);
                    }
                    Err(e) => {
                        prop_assert_eq!(&budget, &before, "a refusal takes nothing");
                        if let Some(wait) = e.retry_after() {
                            assert_exact_retry(|t| budget.check(t, want).is_ok(), now, wait)?;
                        } else {
                            prop_assert!(want > tokens_per_minute);
                        }
                    }
                }
            }
            prop_assert!(budget.available(now) <= tokens_per_minute);
        }
        for r in open {
            budget.settle(now, r, 0);
        }
        prop_assert!(budget.available(now) <= tokens_per_minute);
    }

    #[test]
    fn the_tenant_limiter_takes_all_or_nothing(
        rps in 0.01..100.0_f64,
        request_burst in 1..10_u32,
        tokens_per_minute in 1..50_000_u64,
        max_concurrent in 1..6_u32,
        ops in proptest::collection::vec((step(), 0..60_000_u64, 0..60_000_u64, 0..3_u8), 1..200),
    ) {
        let mut l = TenantLimiter::new(rps, request_burst, tokens_per_minute, max_concurrent).unwrap();
        let mut now = Timestamp::ZERO;
        let mut admitted = Vec::new();
        for (dt, tokens, used, pick) in ops {
            now = now + Duration::from_nanos(dt);
            if pick == 0 && !admitted.is_empty() {
                let a = admitted.swap_remove(usize::try_from(tokens).unwrap() % admitted.len());
                l.complete(now, a, used);
            } else {
                let peek = l.would_admit(now, tokens);
                let before = l.clone();
                match l.check(now, tokens) {
                    Ok(a) => {
                        prop_assert!(peek.is_ok(), "would_admit disagreed with check");
                        prop_assert_eq!(a.reserved_tokens(), tokens);
                        admitted.push(a);
                    }
                    Err(e) => {
                        prop_assert_eq!(Err(e), peek, "would_admit disagreed with check");
                        prop_assert_eq!(&l, &before, "a refusal takes nothing");
                        match (e.kind, e.retry_after) {
                            (LimitKind::RequestRate | LimitKind::TokenRate, Some(wait)) => {
                                // The longer rate wait is exact; only concurrency may still refuse then.
                                let passes = |t| match l.would_admit(t, tokens) {
                                    Ok(()) => true,
                                    Err(e) => e.kind == LimitKind::Concurrency,
                                };
                                assert_exact_retry(passes, now, wait)?;
                            }
                            (LimitKind::Concurrency, None) => {
                                prop_assert_eq!(l.in_flight(), max_concurrent);
                            }
                            (LimitKind::RequestTooLarge, None) => {
                                prop_assert!(tokens > tokens_per_minute);
                            }
                            other => prop_assert!(false, "unexpected refusal {other:?}"),
                        }
                    }
                }
            }
            prop_assert!(l.in_flight() <= max_concurrent);
            prop_assert_eq!(usize::try_from(l.in_flight()).unwrap(), admitted.len());
            prop_assert!(l.available_requests(now) <= u64::from(request_burst));
            prop_assert!(l.available_tokens(now) <= tokens_per_minute);
        }
    }
}

#[test]
fn ten_per_second_with_a_burst_of_five_waits_exactly_100ms() {
    let mut g = Gcra::new(Rate::per_second(10).unwrap(), 5);
    for _ in 0..5 {
        g.try_acquire(Timestamp::ZERO, 1).unwrap();
    }
    let wait = g.try_acquire(Timestamp::ZERO, 1).unwrap_err().retry_after();
    assert_eq!(wait, Some(Duration::from_millis(100)));
    assert!(g.check(Timestamp::from_nanos(99_999_999), 1).is_err());
    assert!(g.try_acquire(Timestamp::from_nanos(100_000_000), 1).is_ok());
}
