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
//! The price is CPU: the thread spins through each window, so with requests
//! closer together than the window it never sleeps, and a core is spent
//! whatever the load. It is off unless asked for (`serve --busy-poll-us`);
//! `bench proxy` measures both.
//!
//! How: one spinner task per runtime thread yields in a loop while the window
//! lasts. A yielding task makes Tokio's worker poll the I/O driver with a zero
//! timeout between runs of its tasks, which is the busy poll. The API calls
//! [`activity`] when a request arrives, the dispatcher when a worker's
//! message does; that extends the window and wakes the spinners if they
//! wait. Nothing else does: timers and stray packets do not keep it spinning.

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::{runtime::Runtime, sync::Notify};

/// The busy poll of a runtime: a window, changeable while it runs, and the
/// time of the last activity.
#[derive(Debug)]
pub struct BusyPoll {
    /// The window in nanoseconds; 0: off.
    window_ns: AtomicU64,
    epoch: Instant,
    /// The last activity, in nanoseconds since `epoch`; 0: none yet.
    last_ns: AtomicU64,
    /// Spinners waiting for activity (none spinning).
    waiting: AtomicBool,
    wake: Notify,
    /// Spins so far (for tests).
    spins: AtomicU64,
}

/// The process's busy poll, the one [`activity`] feeds and `serve`'s runtime polls by.
static PROCESS: LazyLock<Arc<BusyPoll>> = LazyLock::new(|| BusyPoll::new(Duration::ZERO));

/// The process's busy poll (window zero, off, until set).
pub fn process() -> &'static Arc<BusyPoll> {
    &PROCESS
}

/// A request or a worker's message arrived: the process's busy poll, if on,
/// spins on through a window from now. Cheap when off (one atomic load).
pub fn activity() {
    PROCESS.touch();
}

impl BusyPoll {
    /// A busy poll of `window` (zero: off).
    pub fn new(window: Duration) -> Arc<Self> {
        let poll = Arc::new(Self {
            window_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            last_ns: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            wake: Notify::new(),
            spins: AtomicU64::new(0),
        });
        poll.set_window(window);
        poll
    }

    /// Changes the window; zero turns busy polling off at the spinners' next run.
    pub fn set_window(&self, window: Duration) {
        let ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        self.window_ns.store(ns, Ordering::Relaxed);
    }

    /// The window now.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }

    /// Spins so far, all spinners together.
    pub fn spins(&self) -> u64 {
        self.spins.load(Ordering::Relaxed)
    }

    /// Nanoseconds since `epoch`, from 1 (0 is "no activity yet").
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Activity now: spin on through a window from now, waking the spinners.
    pub fn touch(&self) {
        if self.window_ns.load(Ordering::Relaxed) == 0 {
            return;
        }
        // SeqCst here and in `spin`: either the spinner sees this time, or
        // this sees it waiting (and wakes it).
        self.last_ns.store(self.now_ns(), Ordering::SeqCst);
        if self.waiting.swap(false, Ordering::SeqCst) {
            self.wake.notify_waiters();
        }
    }

    /// Whether the last activity is within the window.
    fn in_window(&self) -> bool {
        let window = self.window_ns.load(Ordering::Relaxed);
        let last = self.last_ns.load(Ordering::SeqCst);
        window > 0 && last > 0 && self.now_ns().saturating_sub(last) < window
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

    #[test]
    fn it_spins_after_activity_until_a_window_passes_without() {
        let poll = BusyPoll::new(Duration::from_millis(30));
        let _rt = runtime(1, &poll).unwrap();
        // No activity yet: the spinner waits.
        assert_eq!(spins_over(&poll, Duration::from_millis(50)), 0);
        poll.touch();
        assert!(spinning(&poll), "no spins after activity");
        // Activity keeps it spinning past the first window...
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(100) {
            poll.touch();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(spins_over(&poll, Duration::from_millis(10)) > 0);
        // ...and a window without any stops it.
        assert!(stopped(&poll), "still spinning without activity");
        // The next activity starts it again.
        poll.touch();
        assert!(spinning(&poll), "no spins after new activity");
    }

    #[test]
    fn off_it_never_spins_and_it_can_be_turned_on_and_off_while_running() {
        let poll = BusyPoll::new(Duration::ZERO);
        let rt = runtime(1, &poll).unwrap();
        for _ in 0..10 {
            poll.touch();
            rt.block_on(async { tokio::spawn(async {}).await.unwrap() });
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(poll.spins(), 0);
        poll.set_window(Duration::from_mins(1));
        assert_eq!(poll.window(), Duration::from_mins(1));
        poll.touch();
        assert!(spinning(&poll), "no spins once on");
        // Turned off while spinning (a minute's window), it stops at its next run.
        poll.set_window(Duration::ZERO);
        assert!(stopped(&poll), "still spinning once off");
    }
}
