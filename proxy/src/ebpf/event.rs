//! The kernel's audit events: parsing ring buffer records and tallying drops.
//!
//! The programs batch drops per CPU and tenant ([`DropAggregate`]) and emit
//! one [`EVENT_DROPS`] event per batch, so userspace's count of a tenant's
//! drops is the sum of the events it read plus what is still pending in
//! `BH_DROP_AGG`. Once traffic stops that sum equals the dropped counters
//! exactly ([`EventStream::drop_tally_with_pending`]).

use super::EbpfError;
use super::error::KernelContext as _;
use aya::maps::{MapData, PerCpuArray, RingBuf};
use bulkhead_ebpf_common::{AuditEvent, DropAggregate, EVENT_DROPS, FlowKey};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Size of one ring buffer record.
pub const EVENT_BYTES: usize = size_of::<AuditEvent>();

/// How often [`EventStream::next`] looks at the ring without a wakeup: the
/// kernel batches wakeups (`Settings::wakeup_bytes`), so a trickle of events
/// would otherwise wait for the ring to fill.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Reads `N` bytes at `at`.
fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// An event from the bytes of one ring buffer record (native byte order), or
/// `None` if the record is shorter than an [`AuditEvent`].
pub fn parse_event(bytes: &[u8]) -> Option<AuditEvent> {
    if bytes.len() < EVENT_BYTES {
        return None;
    }
    let u32_at = |at| u32::from_ne_bytes(array(bytes, at));
    let u64_at = |at| u64::from_ne_bytes(array(bytes, at));
    Some(AuditEvent {
        kind: u32_at(0),
        reason: u32_at(4),
        tenant: u32_at(8),
        cpu: u32_at(12),
        time_ns: u64_at(16),
        packets: u64_at(24),
        bytes: u64_at(32),
        flow: FlowKey {
            addr: array(bytes, 40),
            port: u16::from_ne_bytes(array(bytes, 56)),
            protocol: bytes[58],
            family: bytes[59],
        },
        pad: array(bytes, 60),
    })
}

/// The per-tenant sums of the drop events read so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropTally {
    by_tenant: HashMap<u32, (u64, u64)>,
}

impl DropTally {
    /// Adds `event` if it reports drops.
    pub fn record(&mut self, event: &AuditEvent) {
        if event.kind == EVENT_DROPS {
            let entry = self.by_tenant.entry(event.tenant).or_default();
            entry.0 = entry.0.wrapping_add(event.packets);
            entry.1 = entry.1.wrapping_add(event.bytes);
        }
    }

    /// Dropped `(packets, bytes)` of `tenant` reported by events so far.
    pub fn get(&self, tenant: u32) -> (u64, u64) {
        self.by_tenant.get(&tenant).copied().unwrap_or_default()
    }
}

/// Sums the per-CPU pending drops of `tenant`.
pub(crate) fn pending_drops(
    map: &PerCpuArray<MapData, DropAggregate>,
    tenant: u32,
) -> Result<(u64, u64), EbpfError> {
    let values = map
        .get(&tenant, 0)
        .kernel(|| format!("reading BH_DROP_AGG[{tenant}]"))?;
    Ok(values.iter().fold((0, 0), |(p, b), v| {
        (p.wrapping_add(v.packets), b.wrapping_add(v.bytes))
    }))
}

/// The kernel's audit events, read without blocking a thread.
///
/// Must be created and used inside a tokio runtime with I/O and time enabled.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
    drop_agg: PerCpuArray<MapData, DropAggregate>,
    tally: DropTally,
    /// Events read from the ring but not yet returned.
    buffered: VecDeque<AuditEvent>,
    /// Records too short to be an event (a contract mismatch).
    malformed: u64,
    poll_interval: Duration,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("buffered", &self.buffered.len())
            .field("malformed", &self.malformed)
            .field("tally", &self.tally)
            .finish_non_exhaustive()
    }
}

impl EventStream {
    pub(crate) fn new(
        ring: RingBuf<MapData>,
        drop_agg: PerCpuArray<MapData, DropAggregate>,
    ) -> Result<Self, EbpfError> {
        // tokio 1.54 deprecates the safe constructors for the `unsafe fn register`,
        // whose one requirement is that the fd stays open and unchanged while
        // registered: `RingBuf<MapData>` owns its map fd and never replaces or
        // closes it before it is dropped, which `AsyncFd` does after deregistering.
        #[expect(
            deprecated,
            reason = "unsafe code is denied here; RingBuf owns its fd for as long as AsyncFd holds it"
        )]
        let ring = AsyncFd::with_interest(ring, Interest::READABLE).map_err(EbpfError::io(
            "registering the event ring buffer with tokio (needs a runtime with I/O enabled)",
        ))?;
        Ok(Self {
            ring,
            drop_agg,
            tally: DropTally::default(),
            buffered: VecDeque::new(),
            malformed: 0,
            poll_interval: DEFAULT_POLL_INTERVAL,
        })
    }

    /// Sets how often the ring is read without a wakeup ([`DEFAULT_POLL_INTERVAL`]).
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The next event, if one is in the ring now (never waits).
    pub fn try_next(&mut self) -> Option<AuditEvent> {
        if let Some(event) = self.buffered.pop_front() {
            return Some(event);
        }
        loop {
            let item = self.ring.get_mut().next()?;
            let parsed = parse_event(&item);
            drop(item);
            match parsed {
                Some(event) => {
                    self.tally.record(&event);
                    return Some(event);
                }
                None => self.malformed += 1,
            }
        }
    }

    /// The next event, waiting for one.
    pub async fn next(&mut self) -> std::io::Result<AuditEvent> {
        loop {
            if let Some(event) = self.try_next() {
                return Ok(event);
            }
            // The ring was empty: wait for a wakeup, or poll again after the interval.
            if let Ok(guard) =
                tokio::time::timeout(self.poll_interval, self.ring.readable_mut()).await
            {
                guard?.clear_ready();
            }
        }
    }

    /// Drop `(packets, bytes)` of `tenant` carried by the events read so far.
    pub fn drop_tally(&self, tenant: u32) -> (u64, u64) {
        self.tally.get(tenant)
    }

    /// Drops of `tenant` in events plus those still pending in the kernel.
    ///
    /// Reads every event now in the ring first (they stay queued for
    /// [`Self::next`]), so that no batch is counted twice or missed; once
    /// traffic stops this equals the tenant's dropped counters exactly.
    pub fn drop_tally_with_pending(&mut self, tenant: u32) -> Result<(u64, u64), EbpfError> {
        while let Some(event) = self.read_ring() {
            self.buffered.push_back(event);
        }
        let (events_p, events_b) = self.tally.get(tenant);
        let (pending_p, pending_b) = pending_drops(&self.drop_agg, tenant)?;
        Ok((
            events_p.wrapping_add(pending_p),
            events_b.wrapping_add(pending_b),
        ))
    }

    /// Records that were too short to be an event (should stay zero).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// One event straight from the ring (tallied), skipping the buffer.
    fn read_ring(&mut self) -> Option<AuditEvent> {
        let buffered = std::mem::take(&mut self.buffered);
        let event = self.try_next();
        self.buffered = buffered;
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_ebpf_common::{DROP_BYTE_LIMIT, EVENT_FLOW_SEEN, FAMILY_IPV6, PROTO_UDP};

    /// The record as the kernel writes it: the `#[repr(C)]` fields in order, native endian.
    fn to_bytes(e: &AuditEvent) -> Vec<u8> {
        let mut b = Vec::with_capacity(EVENT_BYTES);
        for v in [e.kind, e.reason, e.tenant, e.cpu] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        for v in [e.time_ns, e.packets, e.bytes] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&e.flow.addr);
        b.extend_from_slice(&e.flow.port.to_ne_bytes());
        b.extend_from_slice(&[e.flow.protocol, e.flow.family]);
        b.extend_from_slice(&e.pad);
        b
    }

    fn sample() -> AuditEvent {
        AuditEvent {
            kind: EVENT_DROPS,
            reason: DROP_BYTE_LIMIT,
            tenant: 3,
            cpu: 1,
            time_ns: 0x0102_0304_0506_0708,
            packets: 64,
            bytes: 64 * 1200,
            flow: FlowKey {
                addr: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
                port: 4433,
                protocol: PROTO_UDP,
                family: FAMILY_IPV6,
            },
            pad: [0; 4],
        }
    }

    #[test]
    fn parse_round_trips_the_kernel_layout() {
        let event = sample();
        let bytes = to_bytes(&event);
        assert_eq!(bytes.len(), EVENT_BYTES);
        assert_eq!(parse_event(&bytes), Some(event));
        // A record with trailing bytes (ring records are 8-byte aligned) still parses.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xff; 8]);
        assert_eq!(parse_event(&longer), Some(event));
    }

    #[test]
    fn short_records_are_refused() {
        let bytes = to_bytes(&sample());
        assert_eq!(parse_event(&bytes[..EVENT_BYTES - 1]), None);
        assert_eq!(parse_event(&[]), None);
    }

    #[test]
    fn tally_counts_only_drop_events() {
        let mut tally = DropTally::default();
        let drops = sample();
        tally.record(&drops);
        tally.record(&drops);
        tally.record(&AuditEvent {
            kind: EVENT_FLOW_SEEN,
            packets: 1,
            bytes: 1200,
            ..drops
        });
        assert_eq!(tally.get(3), (128, 128 * 1200));
        assert_eq!(tally.get(4), (0, 0));
    }
}
