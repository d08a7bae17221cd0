//! Busy polling: the proxy runtime's threads keep polling for a short window
//! after the last request or worker message, instead of sleeping at once.
//!
//! A packet that arrives at a sleeping runtime pays for the wake-up: the
//! kernel has to wake the thread (on a VM, an inter-processor interrupt to a
//! halted virtual CPU), and the thread then runs on cold caches. A request
//! through the proxy meets two of them when the proxy is otherwise idle: the
//! request, then the worker's answer. Within a window of activity, a thread
//! polls its sockets instead of sleeping, so the next packet is read at once.
//!
//! The window adapts ([`Adaptive`]), apart for each kind of activity (a
//! request, a worker's message), since what follows them differs: after a
//! request, usually the worker's answer; after the answer, the client's
//! next request, or nothing for a while. A kind's window follows the rule
//! Linux's `haltpoll` cpuidle governor applies to a virtual CPU's idle
//! polling: it grows while the next activity comes late but within the
//! limit, and halves each time none comes within the limit. On top of it,
//! a kind polls only while at least two in three of its recent gaps came
//! within the limit. So it polls only where activity comes closer together
//! than the limit (a burst, a fast worker, a client sending back to back),
//! and stops by itself where it is sparser: a real model's prefill and
//! decode steps, milliseconds apart, or an idle host. The price is CPU, up
//! to a window after each activity, on every runtime thread. `serve` polls
//! with a 200 µs limit, the `haltpoll` default; `serve --busy-poll-us 0`
//! turns it off. `bench proxy` measures both.
//!
//! How: one spinner task per runtime thread yields in a loop while the window
//! lasts. A yielding task makes Tokio's worker poll the I/O driver with a zero
//! timeout between runs of its tasks, which is the busy poll. (Every thread
//! has to: a thread that slept would hold the I/O driver, and the packet
//! would wake it.) The API calls [`activity`] when a request arrives, the
//! dispatcher when a worker's message does; that adapts the window of the
//! kind before it, opens the window of its own kind from now and wakes the
//! spinners if they wait. Nothing else does: timers and stray packets do not
//! keep it spinning.

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::{runtime::Runtime, sync::Notify};

/// `serve`'s busy-poll limit (µs) unless `--busy-poll-us` says otherwise:
/// the `haltpoll` governor's (`guest_halt_poll_ns`, 200 µs).
pub const DEFAULT_LIMIT_US: u64 = 200;

/// The largest limit (µs) `--busy-poll-us` takes: a second.
pub const MAX_LIMIT_US: u64 = 1_000_000;

/// A kind of activity, each with a window of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// A request arrived at the API.
    Request,
    /// A worker's message arrived at the dispatcher.
    Worker,
}

impl Activity {
    /// Its index among the learned states, and its bit in [`BusyPoll`]'s `last`.
    fn index(self) -> usize {
        match self {
            Self::Request => 0,
            Self::Worker => 1,
        }
    }

    /// The time (nanoseconds since the epoch) and kind of a `last` word.
    fn of_last(word: u64) -> (u64, Self) {
        let kind = if word & 1 == 1 {
            Self::Worker
        } else {
            Self::Request
        };
        (word & !1, kind)
    }
}

/// What the rule has learned of one kind of activity from the gaps after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// The window, in nanoseconds.
    pub window_ns: u64,
    /// Gaps within the limit count +1, gaps beyond it -2, within
    /// [`Adaptive::SCORE_MIN`, `Adaptive::SCORE_MAX`]; it polls while above 0.
    pub score: i8,
}

impl Learned {
    /// Packed into one word (the window, at most a second, below the top byte).
    fn pack(self) -> u64 {
        (u64::from(self.score.cast_unsigned()) << 56) | (self.window_ns & ((1 << 56) - 1))
    }

    fn unpack(word: u64) -> Self {
        Self {
            window_ns: word & ((1 << 56) - 1),
            score: u8::try_from(word >> 56).unwrap_or(0).cast_signed(),
        }
    }
}

/// The adaptive rule, sans I/O: after each gap that followed an activity,
/// what its kind has learned. The window is the `haltpoll` governor's
/// (Linux `drivers/cpuidle/governors/haltpoll.c`, its defaults: grow x2 from
/// 50 µs, shrink /2), on the gaps after a kind of activity instead of a
/// virtual CPU's idle periods; the score keeps a kind whose gaps are mostly
/// longer than the limit from polling at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adaptive {
    /// The most it polls after an activity, in nanoseconds; 0: off.
    pub limit_ns: u64,
}

impl Adaptive {
    /// The window a late activity grows a smaller one to (`guest_halt_poll_grow_start`).
    pub const GROW_START_NS: u64 = 50_000;
    /// The score's bounds: a kind that polled keeps on for at most two
    /// gaps beyond the limit; one that did not starts after five within it.
    pub const SCORE_MAX: i8 = 4;
    /// See [`Self::SCORE_MAX`].
    pub const SCORE_MIN: i8 = -4;

    /// What a kind has learned after a gap of `gap_ns` that followed one of
    /// its activities, which had learned `before`. The window:
    /// - the gap within it: polling caught the next activity; the same;
    /// - later, but within the limit: polling longer would have; doubled
    ///   (at least [`Self::GROW_START_NS`]), up to the limit;
    /// - later than the limit: polling was spent in vain; halved.
    #[must_use]
    pub fn next(self, before: Learned, gap_ns: u64) -> Learned {
        let window_ns = before.window_ns.min(self.limit_ns);
        let within = gap_ns <= self.limit_ns;
        Learned {
            window_ns: if gap_ns <= window_ns {
                window_ns
            } else if within {
                window_ns
                    .saturating_mul(2)
                    .max(Self::GROW_START_NS)
                    .min(self.limit_ns)
            } else {
                window_ns / 2
            },
            score: if within {
                before.score.saturating_add(1).min(Self::SCORE_MAX)
            } else {
                before.score.saturating_sub(2).max(Self::SCORE_MIN)
            },
        }
    }

    /// How long to poll after an activity of a kind that has learned `learned`.
    #[must_use]
    pub fn poll_ns(self, learned: Learned) -> u64 {
        if learned.score > 0 {
            learned.window_ns.min(self.limit_ns)
        } else {
            0
        }
    }
}

/// The busy poll of a runtime: its limit, changeable while it runs, what
/// each kind of activity has learned, and the time of the last activity.
#[derive(Debug)]
pub struct BusyPoll {
    /// The limit in nanoseconds; 0: off.
    limit_ns: AtomicU64,
    /// Each kind's [`Learned`], packed.
    learned: [AtomicU64; 2],
    epoch: Instant,
    /// The last activity, in nanoseconds since `epoch` with its kind's index
    /// in the lowest bit; 0: none yet.
    last: AtomicU64,
    /// Spinners waiting for activity (none spinning).
    waiting: AtomicBool,
    wake: Notify,
    /// Spins so far (for tests).
    spins: AtomicU64,
}

/// The process's busy poll, the one [`activity`] feeds and `serve`'s runtime polls by.
static PROCESS: LazyLock<Arc<BusyPoll>> = LazyLock::new(|| BusyPoll::new(Duration::ZERO));

/// The process's busy poll (limit zero, off, until set).
pub fn process() -> &'static Arc<BusyPoll> {
    &PROCESS
}

/// A request or a worker's message arrived: the process's busy poll, if on,
/// learns from the gap before it and spins on through its kind's window from
/// now. Cheap when off (one atomic load).
pub fn activity(kind: Activity) {
    PROCESS.touch(kind);
}

impl BusyPoll {
    /// A busy poll that polls up to `limit` after an activity (zero: off).
    pub fn new(limit: Duration) -> Arc<Self> {
        let poll = Arc::new(Self {
            limit_ns: AtomicU64::new(0),
            learned: [AtomicU64::new(0), AtomicU64::new(0)],
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            wake: Notify::new(),
            spins: AtomicU64::new(0),
        });
        poll.set_limit(limit);
        poll
    }

    /// Changes the limit (at most [`MAX_LIMIT_US`]); zero turns busy polling
    /// off at the spinners' next run. What was learned so far is kept.
    pub fn set_limit(&self, limit: Duration) {
        let ns = limit.min(Duration::from_micros(MAX_LIMIT_US)).as_nanos();
        self.limit_ns
            .store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The limit now.
    pub fn limit(&self) -> Duration {
        Duration::from_nanos(self.limit_ns.load(Ordering::Relaxed))
    }

    fn rule(&self) -> Adaptive {
        Adaptive {
            limit_ns: self.limit_ns.load(Ordering::Relaxed),
        }
    }

    /// What `kind` has learned so far.
    pub fn learned(&self, kind: Activity) -> Learned {
        Learned::unpack(self.learned[kind.index()].load(Ordering::Relaxed))
    }

    /// How long it polls after an activity of `kind` now (zero: not at all).
    pub fn window(&self, kind: Activity) -> Duration {
        Duration::from_nanos(self.rule().poll_ns(self.learned(kind)))
    }

    /// Spins so far, all spinners together.
    pub fn spins(&self) -> u64 {
        self.spins.load(Ordering::Relaxed)
    }

    /// Nanoseconds since `epoch`, from 2 and even (0 is "no activity yet",
    /// the lowest bit is the kind's).
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(2)
            & !1
    }

    /// An activity of `kind` now: the kind of the last one learns from the
    /// gap, and the spinners spin on through `kind`'s window from now (if
    /// it has one).
    pub fn touch(&self, kind: Activity) {
        let rule = self.rule();
        if rule.limit_ns == 0 {
            return;
        }
        let now = self.now_ns();
        // SeqCst here and in `spin`: either the spinner sees this time, or
        // this sees it waiting (and wakes it).
        let last = self
            .last
            .swap(now | (kind.index() as u64), Ordering::SeqCst);
        if last != 0 {
            let (then, before) = Activity::of_last(last);
            let gap = now.saturating_sub(then);
            // Activities racing on two threads each apply their gap; the
            // rule is a heuristic, and either order leaves it within bounds.
            let _ = self.learned[before.index()].fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |word| Some(rule.next(Learned::unpack(word), gap).pack()),
            );
        }
        // Waiting spinners are woken only if this kind polls: one that does
        // not costs no task wake-up (on another thread, another CPU's).
        if rule.poll_ns(self.learned(kind)) > 0 && self.waiting.swap(false, Ordering::SeqCst) {
            self.wake.notify_waiters();
        }
    }

    /// Whether the last activity is within its kind's window.
    fn in_window(&self) -> bool {
        let last = self.last.load(Ordering::SeqCst);
        if last == 0 {
            return false;
        }
        let (then, kind) = Activity::of_last(last);
        let window = self.rule().poll_ns(self.learned(kind));
        window > 0 && self.now_ns().saturating_sub(then) < window
    }

    /// One spinner: waits for activity, then spins while it is within the window.
    async fn spin(self: Arc<Self>) {
        loop {
            let woken = self.wake.notified();
            self.waiting.store(true, Ordering::SeqCst);
            if !self.in_window() {
                woken.await;
            }
            self.waiting.store(false, Ordering::SeqCst);
            while self.in_window() {
                tokio::task::yield_now().await;
                self.spins.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The proxy's multi-thread runtime with `threads` threads, busy polling
/// per `poll` (whose window may be zero, and may change later).
pub fn runtime(threads: usize, poll: &Arc<BusyPoll>) -> std::io::Result<Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    for _ in 0..threads {
        runtime.spawn(Arc::clone(poll).spin());
    }
    Ok(runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins counted over `time`.
    fn spins_over(poll: &BusyPoll, time: Duration) -> u64 {
        let before = poll.spins();
        std::thread::sleep(time);
        poll.spins() - before
    }

    /// Waits (up to 5 s, for a loaded machine) until it spins.
    fn spinning(poll: &BusyPoll) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        let before = poll.spins();
        while Instant::now() < deadline {
            if poll.spins() > before {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Waits (up to 5 s) until 50 ms pass without a spin.
    fn stopped(poll: &BusyPoll) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if spins_over(poll, Duration::from_millis(50)) == 0 {
                return true;
            }
        }
        false
    }

    /// `touches` requests `gap` apart.
    fn touch_every(poll: &BusyPoll, gap: Duration, touches: usize) {
        for _ in 0..touches {
            poll.touch(Activity::Request);
            std::thread::sleep(gap);
        }
    }

    #[test]
    fn it_spins_while_activity_comes_within_the_limit_and_stops_without() {
        let poll = BusyPoll::new(Duration::from_millis(30));
        let _rt = runtime(1, &poll).unwrap();
        // No activity yet: the spinner waits.
        assert_eq!(spins_over(&poll, Duration::from_millis(50)), 0);
        // The first activity has no gap to learn from: no window yet.
        poll.touch(Activity::Request);
        assert_eq!(poll.window(Activity::Request), Duration::ZERO);
        // Requests every 2 ms, within the 30 ms limit: the window grows to
        // cover the gaps, and it spins between them.
        touch_every(&poll, Duration::from_millis(2), 12);
        let window = poll.window(Activity::Request);
        assert!(window >= Duration::from_millis(2), "{window:?}");
        assert!(window <= Duration::from_millis(30));
        // Nothing was learned of the other kind.
        assert_eq!(poll.learned(Activity::Worker), Learned::default());
        poll.touch(Activity::Request);
        assert!(spinning(&poll), "no spins with activity every 2 ms");
        // A window without activity stops it.
        assert!(stopped(&poll), "still spinning without activity");
        // Activity after more than the limit halves the window (the last
        // polling was in vain)...
        let before = poll.learned(Activity::Request);
        poll.touch(Activity::Request);
        let after = poll.learned(Activity::Request);
        assert_eq!(after.window_ns, before.window_ns / 2);
        assert_eq!(after.score, before.score - 2);
        // ...and activity close again spins again.
        touch_every(&poll, Duration::from_millis(1), 3);
        assert!(spinning(&poll), "no spins after new activity");
    }

    #[test]
    fn sparse_activity_never_opens_a_window() {
        let poll = BusyPoll::new(Duration::from_micros(200));
        let _rt = runtime(1, &poll).unwrap();
        // Every 5 ms, 25 times the limit: polling would always be in vain.
        touch_every(&poll, Duration::from_millis(5), 20);
        assert_eq!(poll.window(Activity::Request), Duration::ZERO);
        assert_eq!(poll.learned(Activity::Request).score, Adaptive::SCORE_MIN);
        assert_eq!(poll.spins(), 0);
    }

    #[test]
    fn each_kind_learns_from_the_gaps_after_it() {
        let poll = BusyPoll::new(Duration::from_millis(30));
        // A request answered 1 ms later, then 40 ms until the next request:
        // after a request polling pays, after an answer it would not.
        for _ in 0..6 {
            poll.touch(Activity::Request);
            std::thread::sleep(Duration::from_millis(1));
            poll.touch(Activity::Worker);
            std::thread::sleep(Duration::from_millis(40));
        }
        assert!(poll.window(Activity::Request) >= Duration::from_millis(1));
        assert_eq!(poll.window(Activity::Worker), Duration::ZERO);
        assert_eq!(poll.learned(Activity::Worker).score, Adaptive::SCORE_MIN);
    }

    #[test]
    fn off_it_never_spins_and_it_can_be_turned_on_and_off_while_running() {
        let poll = BusyPoll::new(Duration::ZERO);
        let rt = runtime(1, &poll).unwrap();
        for _ in 0..10 {
            poll.touch(Activity::Request);
            rt.block_on(async { tokio::spawn(async {}).await.unwrap() });
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(poll.spins(), 0);
        assert_eq!(poll.learned(Activity::Request), Learned::default());
        poll.set_limit(Duration::from_mins(1));
        // Capped at a second.
        assert_eq!(poll.limit(), Duration::from_secs(1));
        // Activity every millisecond from another thread, until told to stop.
        let stop = Arc::new(AtomicBool::new(false));
        let toucher = {
            let (poll, stop) = (Arc::clone(&poll), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    poll.touch(Activity::Worker);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        assert!(spinning(&poll), "no spins once on");
        // Turned off while activity goes on, it stops at its next run.
        poll.set_limit(Duration::ZERO);
        assert_eq!(poll.window(Activity::Worker), Duration::ZERO);
        assert!(stopped(&poll), "still spinning once off");
        stop.store(true, Ordering::Relaxed);
        toucher.join().unwrap();
    }

    const US: u64 = 1_000;

    fn learned(window_ns: u64, score: i8) -> Learned {
        Learned { window_ns, score }
    }

    #[test]
    fn the_window_grows_from_50_us_doubling_to_the_limit_keeps_a_hit_and_halves_in_vain() {
        let rule = Adaptive { limit_ns: 200 * US };
        let window = |w: u64, gap: u64| rule.next(learned(w, 1), gap).window_ns;
        // Late but within the limit: grows, from 50 µs, doubling, up to it.
        assert_eq!(window(0, 10 * US), 50 * US);
        assert_eq!(window(50 * US, 80 * US), 100 * US);
        assert_eq!(window(100 * US, 150 * US), 200 * US);
        assert_eq!(window(200 * US, 200 * US), 200 * US);
        assert_eq!(window(150 * US, 190 * US), 200 * US);
        // Within the window: the same.
        assert_eq!(window(100 * US, 100 * US), 100 * US);
        assert_eq!(window(100 * US, 1), 100 * US);
        // Later than the limit: halved, down to nothing.
        assert_eq!(window(200 * US, 200 * US + 1), 100 * US);
        assert_eq!(window(0, 10_000 * US), 0);
        assert_eq!(window(1, 10_000 * US), 0);
        // A window above a lowered limit is cut to it first.
        assert_eq!(window(400 * US, 150 * US), 200 * US);
        assert_eq!(window(400 * US, 300 * US), 100 * US);
        // Off: always nothing.
        let off = Adaptive { limit_ns: 0 };
        assert_eq!(off.next(learned(0, 4), 1).window_ns, 0);
        assert_eq!(off.poll_ns(off.next(learned(200 * US, 4), 1)), 0);
    }

    #[test]
    fn the_score_gains_one_within_the_limit_loses_two_beyond_and_gates_polling() {
        let rule = Adaptive { limit_ns: 200 * US };
        let score = |s: i8, gap: u64| rule.next(learned(100 * US, s), gap).score;
        assert_eq!(score(0, 10 * US), 1);
        assert_eq!(score(4, 10 * US), 4);
        assert_eq!(score(1, 300 * US), -1);
        assert_eq!(score(-3, 300 * US), -4);
        assert_eq!(score(-4, 300 * US), -4);
        assert_eq!(rule.poll_ns(learned(100 * US, 1)), 100 * US);
        assert_eq!(rule.poll_ns(learned(100 * US, 0)), 0);
        assert_eq!(rule.poll_ns(learned(100 * US, -4)), 0);
        assert_eq!(rule.poll_ns(learned(900 * US, 4)), 200 * US);
        for state in [
            learned(0, 0),
            learned(123_456, -4),
            learned(1 << 40, 4),
            learned(7, -1),
        ] {
            assert_eq!(Learned::unpack(state.pack()), state);
        }
    }

    /// What polling after each gap of `gaps` (one kind, from `from`) costs:
    /// the time spent polling in all, the gaps it caught, and what it learned.
    fn simulate(rule: Adaptive, from: Learned, gaps: &[u64]) -> (u64, usize, Learned) {
        let (mut polled, mut caught, mut state) = (0u64, 0usize, from);
        for &gap in gaps {
            // The spinners poll through the window, or until the next activity.
            let window = rule.poll_ns(state);
            polled += gap.min(window);
            caught += usize::from(gap <= window);
            state = rule.next(state, gap);
        }
        (polled, caught, state)
    }

    use proptest::prelude::*;

    fn any_learned(limit: u64) -> impl Strategy<Value = Learned> {
        (0..=2 * limit, Adaptive::SCORE_MIN..=Adaptive::SCORE_MAX)
            .prop_map(|(window_ns, score)| Learned { window_ns, score })
    }

    proptest! {
        #[test]
        fn the_window_never_passes_the_limit_nor_the_score_its_bounds(
            (limit, from) in (0u64..1_000_000).prop_flat_map(|l| (Just(l), any_learned(l))),
            gaps in proptest::collection::vec(0u64..3_000_000, 0..200),
        ) {
            let rule = Adaptive { limit_ns: limit };
            let mut state = from;
            for gap in gaps {
                state = rule.next(state, gap);
                prop_assert!(state.window_ns <= limit);
                prop_assert!(rule.poll_ns(state) <= limit);
                prop_assert!((Adaptive::SCORE_MIN..=Adaptive::SCORE_MAX).contains(&state.score));
                prop_assert_eq!(Learned::unpack(state.pack()), state);
            }
        }

        /// Activity sparser than the limit costs at most two windows, the
        /// one it found and half of it, and then nothing: a real model's
        /// steps, or an idle host.
        #[test]
        fn sparse_activity_polls_at_most_twice(
            (limit, from) in (1u64..1_000_000).prop_flat_map(|l| (Just(l), any_learned(l))),
            extra in proptest::collection::vec(1u64..1_000_000_000, 1..100),
        ) {
            let rule = Adaptive { limit_ns: limit };
            let gaps: Vec<u64> = extra.iter().map(|e| limit + e).collect();
            let (polled, caught, _) = simulate(rule, from, &gaps);
            prop_assert_eq!(caught, 0);
            let window = from.window_ns.min(limit);
            prop_assert!(polled <= window + window / 2, "polled {} from {:?}", polled, from);
            let (after_two, _, _) = simulate(rule, from, &gaps[..gaps.len().min(2)]);
            prop_assert_eq!(polled, after_two, "polled after the second sparse gap");
        }

        /// Activity that keeps coming within the limit is missed at most
        /// eight times, whatever was learned before: while the score climbs
        /// from its floor (five gaps), and while the window grows to the
        /// limit (three misses: 50 -> 100 -> 200 µs); nothing shrinks
        /// either. It is caught the rest of the time.
        #[test]
        fn activity_within_the_limit_is_missed_at_most_eight_times(
            from in any_learned(200_000),
            gaps in proptest::collection::vec(0u64..=200_000, 0..200),
        ) {
            let rule = Adaptive { limit_ns: 200_000 };
            let (_, caught, _) = simulate(rule, from, &gaps);
            prop_assert!(gaps.len() - caught <= 8, "{} of {} missed", gaps.len() - caught, gaps.len());
        }

        /// A kind whose gaps are beyond the limit one time in two or more
        /// (after a request answered at once, the client's next request a
        /// while later, say) stops polling: a bounded cost, then none.
        #[test]
        fn activity_mostly_beyond_the_limit_stops_polling(
            from in any_learned(200_000),
            cycles in 4usize..100,
            short in 0u64..=200_000,
            long in 200_001u64..100_000_000,
        ) {
            let rule = Adaptive { limit_ns: 200_000 };
            let gaps: Vec<u64> = std::iter::repeat_n([short, long], cycles).flatten().collect();
            let (polled, _, end) = simulate(rule, from, &gaps);
            prop_assert!(end.score <= 0, "{:?}", end);
            // Polling ends within the first four cycles.
            let (first, _, _) = simulate(rule, from, &gaps[..8]);
            prop_assert_eq!(polled, first);
        }
    }
}
