//! The bounded ring between the request path and the writer thread.
//!
//! Producers wait a bounded time for room, then get [`SubmitError::Full`]:
//! an event is in the ring, or its producer knows it is not. Nothing is
//! dropped. The writer drains everything queued at once (a group), makes it
//! durable, then raises the durable watermark producers may wait on.

use bulkhead_core::audit::AuditEvent;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A submitted event's place in the ring's order: the event is durable once
/// [`AuditSink::durable_through`] reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// Why [`AuditSink::try_submit`] did not take an event.
#[derive(Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned, not stored: boxing would allocate on the full path for nothing"
)]
pub enum NotTaken {
    /// The ring is full now: the event, to submit again with a wait.
    Full(AuditEvent),
    /// The writer has stopped.
    Closed,
}

impl From<NotTaken> for SubmitError {
    /// A try that found the ring full waited for nothing.
    fn from(not_taken: NotTaken) -> Self {
        match not_taken {
            NotTaken::Full(_) => Self::Full {
                waited: Duration::ZERO,
            },
            NotTaken::Closed => Self::Closed,
        }
    }
}

/// Why an event was not taken into the ring.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The ring stayed full for the whole wait: the writer is not keeping
    /// up. Refuse the work this event records.
    #[error("audit ring full for {waited:?}: the audit writer is not keeping up")]
    Full {
        /// How long the producer waited.
        waited: Duration,
    },
    /// The writer has stopped (shut down, or failed).
    #[error("audit writer stopped")]
    Closed,
}

/// Why waiting for durability ended without it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurableError {
    /// The timeout passed first.
    #[error("audit record not durable after {0:?}")]
    Timeout(Duration),
    /// The writer stopped before making it durable.
    #[error("audit writer stopped before the record was durable")]
    Closed,
}

/// Counters for metrics: a snapshot of the ring and the writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditCounters {
    /// Events taken into the ring.
    pub submitted: u64,
    /// Events sealed, written and fsynced.
    pub written: u64,
    /// Submissions refused because the ring stayed full.
    pub full_refusals: u64,
    /// Submissions that had to wait for room.
    pub waited: u64,
    /// Events in the ring now.
    pub ring_depth: u64,
    /// The ring's capacity.
    pub ring_capacity: u64,
    /// Group commits done (each: write + fsync per partition touched).
    pub groups: u64,
    /// Write or fsync failures (each retried; the ring backs up meanwhile).
    pub write_errors: u64,
    /// Events the writer could not seal (larger than a record may be).
    pub seal_errors: u64,
    /// Highest ticket durable (0: none).
    pub durable_through: u64,
}

pub(super) struct Entry {
    pub(super) ticket: Ticket,
    pub(super) event: AuditEvent,
}

struct State {
    queue: VecDeque<Entry>,
    next_ticket: u64,
    closed: bool,
    writer_waiting: bool,
    producers_waiting: usize,
}

struct Durable {
    through: u64,
    closed: bool,
}

pub(super) struct Shared {
    state: Mutex<State>,
    capacity: usize,
    not_full: Condvar,
    not_empty: Condvar,
    durable: Mutex<Durable>,
    durable_changed: Condvar,
    submitted: AtomicU64,
    full_refusals: AtomicU64,
    waited: AtomicU64,
    pub(super) written: AtomicU64,
    pub(super) groups: AtomicU64,
    pub(super) write_errors: AtomicU64,
    pub(super) seal_errors: AtomicU64,
    durable_through: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A producer that panicked holding the lock left the queue consistent
    // (every mutation is a single push or drain).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The producers' handle on the audit ring: cheap to clone, shared by every
/// request task.
#[derive(Clone)]
pub struct AuditSink {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("counters", &self.counters())
            .finish()
    }
}

impl AuditSink {
    pub(super) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::with_capacity(capacity),
                    next_ticket: 1,
                    closed: false,
                    writer_waiting: false,
                    producers_waiting: 0,
                }),
                capacity,
                not_full: Condvar::new(),
                not_empty: Condvar::new(),
                durable: Mutex::new(Durable {
                    through: 0,
                    closed: false,
                }),
                durable_changed: Condvar::new(),
                submitted: AtomicU64::new(0),
                full_refusals: AtomicU64::new(0),
                waited: AtomicU64::new(0),
                written: AtomicU64::new(0),
                groups: AtomicU64::new(0),
                write_errors: AtomicU64::new(0),
                seal_errors: AtomicU64::new(0),
                durable_through: AtomicU64::new(0),
            }),
        }
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Puts `event` into the ring if there is room now. A full ring hands
    /// it back ([`NotTaken::Full`], for [`Self::submit`] to wait with, off
    /// the async threads), so the caller need not keep a copy; it is not
    /// counted as refused.
    #[expect(
        clippy::result_large_err,
        reason = "the event comes back by value so the common path never copies it"
    )]
    pub fn try_submit(&self, event: AuditEvent) -> Result<Ticket, NotTaken> {
        let s = &*self.shared;
        let st = lock(&s.state);
        if st.closed {
            return Err(NotTaken::Closed);
        }
        if st.queue.len() >= s.capacity {
            // Not a refusal yet: the caller submits it again, waiting.
            return Err(NotTaken::Full(event));
        }
        Ok(Self::push(s, st, event))
    }

    /// Puts `event` into the ring, waiting at most `max_wait` for room.
    ///
    /// `Ok` means the event is in the ring and will be written (the writer
    /// drains the ring before it stops); the request it records may be
    /// reported complete. [`SubmitError::Full`] means it is not: refuse or
    /// fail the request, visibly.
    pub fn submit(&self, event: AuditEvent, max_wait: Duration) -> Result<Ticket, SubmitError> {
        let s = &*self.shared;
        let mut st = lock(&s.state);
        if !st.closed && st.queue.len() >= s.capacity {
            let start = Instant::now();
            s.waited.fetch_add(1, Ordering::Relaxed);
            while !st.closed && st.queue.len() >= s.capacity {
                let waited = start.elapsed();
                let Some(left) = max_wait.checked_sub(waited).filter(|d| !d.is_zero()) else {
                    s.full_refusals.fetch_add(1, Ordering::Relaxed);
                    return Err(SubmitError::Full { waited });
                };
                st.producers_waiting += 1;
                st = s
                    .not_full
                    .wait_timeout(st, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                st.producers_waiting -= 1;
            }
        }
        if st.closed {
            return Err(SubmitError::Closed);
        }
        Ok(Self::push(s, st, event))
    }

    /// Appends `event` under the held lock `st`, then wakes the writer if it waits.
    fn push(s: &Shared, mut st: MutexGuard<'_, State>, event: AuditEvent) -> Ticket {
        let ticket = Ticket(st.next_ticket);
        st.next_ticket += 1;
        st.queue.push_back(Entry { ticket, event });
        let wake = st.writer_waiting;
        drop(st);
        s.submitted.fetch_add(1, Ordering::Relaxed);
        if wake {
            s.not_empty.notify_one();
        }
        ticket
    }

    /// The highest ticket whose event (and every earlier one) is durable.
    pub fn durable_through(&self) -> Ticket {
        Ticket(self.shared.durable_through.load(Ordering::Acquire))
    }

    /// Waits until `ticket`'s event is sealed, written and fsynced.
    pub fn wait_durable(&self, ticket: Ticket, timeout: Duration) -> Result<(), DurableError> {
        let s = &*self.shared;
        let start = Instant::now();
        let mut d = lock(&s.durable);
        loop {
            if d.through >= ticket.0 {
                return Ok(());
            }
            if d.closed {
                return Err(DurableError::Closed);
            }
            let Some(left) = timeout
                .checked_sub(start.elapsed())
                .filter(|t| !t.is_zero())
            else {
                return Err(DurableError::Timeout(timeout));
            };
            d = s
                .durable_changed
                .wait_timeout(d, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A snapshot of the counters, for metrics.
    pub fn counters(&self) -> AuditCounters {
        let s = &*self.shared;
        let depth = lock(&s.state).queue.len();
        AuditCounters {
            submitted: s.submitted.load(Ordering::Relaxed),
            written: s.written.load(Ordering::Relaxed),
            full_refusals: s.full_refusals.load(Ordering::Relaxed),
            waited: s.waited.load(Ordering::Relaxed),
            ring_depth: depth as u64,
            ring_capacity: s.capacity as u64,
            groups: s.groups.load(Ordering::Relaxed),
            write_errors: s.write_errors.load(Ordering::Relaxed),
            seal_errors: s.seal_errors.load(Ordering::Relaxed),
            durable_through: s.durable_through.load(Ordering::Acquire),
        }
    }
}

impl Shared {
    /// The writer's side: waits up to `tick` for events, then moves up to
    /// `max` of them into `out`. `false` once the ring is closed and empty.
    ///
    /// When everything queued fits, the queue is swapped with `out` (which
    /// must be empty) rather than moved entry by entry, so producers wait on
    /// the lock for O(1), whatever the group's size.
    ///
    /// Woken by the first event of a group, it lingers for `linger` (without
    /// the lock, so producers are not slowed) to let the group fill: one
    /// write and fsync then covers every event that came meanwhile, instead
    /// of one per wake-up. Producers never wait for durability, only for
    /// room, so the linger costs them nothing.
    pub(super) fn take_batch(
        &self,
        out: &mut VecDeque<Entry>,
        max: usize,
        tick: Duration,
        linger: Duration,
    ) -> bool {
        let mut st = lock(&self.state);
        if st.queue.is_empty() && !st.closed {
            st.writer_waiting = true;
            st = self
                .not_empty
                .wait_timeout(st, tick)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            st.writer_waiting = false;
            if !linger.is_zero() && !st.closed && !st.queue.is_empty() && st.queue.len() < max {
                drop(st);
                std::thread::sleep(linger);
                st = lock(&self.state);
            }
        }
        if out.is_empty() && st.queue.len() <= max {
            std::mem::swap(&mut st.queue, out);
        } else {
            let n = st.queue.len().min(max);
            out.extend(st.queue.drain(..n));
        }
        let wake = st.producers_waiting > 0;
        let more = !(st.closed && st.queue.is_empty() && out.is_empty());
        drop(st);
        if wake {
            self.not_full.notify_all();
        }
        more
    }

    /// Stops taking events; the writer still drains what is queued.
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.not_full.notify_all();
        self.not_empty.notify_all();
    }

    /// Whether the ring is closed.
    pub(super) fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Every ticket up to `through` is durable.
    pub(super) fn mark_durable(&self, through: Ticket) {
        let mut d = lock(&self.durable);
        if through.0 > d.through {
            d.through = through.0;
            self.durable_through.store(through.0, Ordering::Release);
        }
        drop(d);
        self.durable_changed.notify_all();
    }

    /// The writer has stopped: wake every durability waiter.
    pub(super) fn writer_stopped(&self) {
        self.close();
        lock(&self.durable).closed = true;
        self.durable_changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_core::audit::{ConnectionRefused, EventKind};

    fn event() -> AuditEvent {
        AuditEvent {
            time_unix_ns: 0,
            kind: EventKind::ConnectionRefused(ConnectionRefused {
                tenant: None,
                source: None,
                reason: "test".into(),
            }),
        }
    }

    #[test]
    fn a_full_ring_refuses_after_the_wait_and_counts_it() {
        let sink = AuditSink::new(2);
        assert_eq!(sink.submit(event(), Duration::ZERO), Ok(Ticket(1)));
        assert_eq!(sink.submit(event(), Duration::ZERO), Ok(Ticket(2)));
        let err = sink.submit(event(), Duration::from_millis(5)).unwrap_err();
        assert!(matches!(err, SubmitError::Full { waited } if waited >= Duration::from_millis(5)));
        let c = sink.counters();
        assert_eq!((c.submitted, c.full_refusals, c.ring_depth), (2, 1, 2));
        let mut out = VecDeque::new();
        assert!(
            sink.shared()
                .take_batch(&mut out, 10, Duration::ZERO, Duration::ZERO)
        );
        assert_eq!(out.len(), 2);
        assert_eq!(sink.submit(event(), Duration::ZERO), Ok(Ticket(3)));
    }

    #[test]
    fn try_submit_hands_back_what_a_full_ring_cannot_take_without_refusing_it() {
        let sink = AuditSink::new(1);
        assert_eq!(sink.try_submit(event()), Ok(Ticket(1)));
        let Err(NotTaken::Full(back)) = sink.try_submit(event()) else {
            panic!("a full ring took the event");
        };
        assert_eq!(back, event());
        let c = sink.counters();
        assert_eq!((c.submitted, c.full_refusals, c.ring_depth), (1, 0, 1));
        // What came back is submitted again once there is room.
        let mut out = VecDeque::new();
        sink.shared()
            .take_batch(&mut out, 10, Duration::ZERO, Duration::ZERO);
        assert_eq!(sink.submit(back, Duration::ZERO), Ok(Ticket(2)));
        sink.shared().writer_stopped();
        assert_eq!(sink.try_submit(event()), Err(NotTaken::Closed));
    }

    #[test]
    fn a_waiting_producer_gets_in_when_the_writer_drains() {
        let sink = AuditSink::new(1);
        sink.submit(event(), Duration::ZERO).unwrap();
        let producer = {
            let sink = sink.clone();
            std::thread::spawn(move || sink.submit(event(), Duration::from_secs(10)))
        };
        while sink.counters().waited == 0 {
            std::thread::yield_now();
        }
        let mut out = VecDeque::new();
        sink.shared()
            .take_batch(&mut out, 10, Duration::ZERO, Duration::ZERO);
        assert_eq!(producer.join().unwrap(), Ok(Ticket(2)));
        sink.shared().mark_durable(Ticket(2));
        assert_eq!(sink.wait_durable(Ticket(2), Duration::ZERO), Ok(()));
        assert_eq!(
            sink.wait_durable(Ticket(3), Duration::from_millis(1)),
            Err(DurableError::Timeout(Duration::from_millis(1)))
        );
        sink.shared().writer_stopped();
        assert_eq!(
            sink.submit(event(), Duration::ZERO),
            Err(SubmitError::Closed)
        );
        assert_eq!(
            sink.wait_durable(Ticket(3), Duration::from_secs(10)),
            Err(DurableError::Closed)
        );
    }
}
