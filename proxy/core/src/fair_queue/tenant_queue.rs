//! One tenant's FIFO of queued requests, with removal by sequence number.
//!
//! A `VecDeque` kept sorted by sequence number: new requests go to the back
//! with a larger number, put-back ones to the front with a smaller one.
//! Removal from the middle leaves a tombstone (the payload is dropped at
//! once) that is skipped when it reaches the front; tombstones are compacted
//! away when they outnumber the live entries, so memory stays proportional to
//! what is queued. Pushes and pops are O(1) and touch one contiguous buffer.

use std::collections::VecDeque;

#[derive(Debug)]
pub(super) struct TenantQueue<E> {
    /// (sequence number, entry or tombstone), sorted by sequence number;
    /// never starts or ends with a tombstone.
    items: VecDeque<(u64, Option<E>)>,
    live: usize,
}

impl<E> Default for TenantQueue<E> {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            live: 0,
        }
    }
}

impl<E> TenantQueue<E> {
    pub(super) fn len(&self) -> usize {
        self.live
    }

    pub(super) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The sequence number of the first live entry.
    pub(super) fn front_seq(&self) -> Option<u64> {
        self.items.front().map(|(seq, _)| *seq)
    }

    /// Appends an entry; `seq` must exceed every queued sequence number.
    pub(super) fn push_back(&mut self, seq: u64, entry: E) {
        debug_assert!(self.items.back().is_none_or(|(last, _)| *last < seq));
        self.items.push_back((seq, Some(entry)));
        self.live += 1;
    }

    /// Prepends an entry; `seq` must be below every queued sequence number.
    pub(super) fn push_front(&mut self, seq: u64, entry: E) {
        debug_assert!(self.items.front().is_none_or(|(first, _)| *first > seq));
        self.items.push_front((seq, Some(entry)));
        self.live += 1;
    }

    pub(super) fn pop_front(&mut self) -> Option<(u64, E)> {
        let (seq, entry) = self.items.pop_front()?;
        let entry = entry.expect("the front is never a tombstone");
        self.live -= 1;
        self.trim();
        Some((seq, entry))
    }

    /// Removes the entry with sequence number `seq`, if it is queued.
    pub(super) fn remove(&mut self, seq: u64) -> Option<E> {
        let at = self.items.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        let entry = self.items[at].1.take()?;
        self.live -= 1;
        self.trim();
        if self.items.len() > 2 * self.live + 16 {
            self.items.retain(|(_, e)| e.is_some());
        }
        Some(entry)
    }

    /// Whether an entry with sequence number `seq` is queued.
    pub(super) fn contains(&self, seq: u64) -> bool {
        self.items
            .binary_search_by_key(&seq, |(s, _)| *s)
            .is_ok_and(|at| self.items[at].1.is_some())
    }

    /// The first live entry.
    pub(super) fn front(&self) -> Option<&E> {
        self.items.iter().find_map(|(_, e)| e.as_ref())
    }

    /// Live entries in order.
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &E)> {
        self.items
            .iter()
            .filter_map(|(seq, e)| e.as_ref().map(|e| (*seq, e)))
    }

    /// Takes every live entry, in order, leaving the queue empty.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = E> + use<E> {
        self.live = 0;
        std::mem::take(&mut self.items)
            .into_iter()
            .filter_map(|(_, e)| e)
    }

    /// Restores the invariant that neither end is a tombstone.
    fn trim(&mut self) {
        while self.items.front().is_some_and(|(_, e)| e.is_none()) {
            self.items.pop_front();
        }
        while self.items.back().is_some_and(|(_, e)| e.is_none()) {
            self.items.pop_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_anywhere_keeps_order_and_compacts_tombstones() {
        let mut q = TenantQueue::default();
        for seq in 10..110 {
            q.push_back(seq, seq);
        }
        q.push_front(5, 5);
        assert_eq!(q.remove(50), Some(50));
        assert_eq!(q.remove(50), None);
        assert_eq!(q.remove(7), None);
        assert_eq!(q.pop_front(), Some((5, 5)));
        // Remove most of the middle: tombstones get compacted away.
        for seq in 20..100 {
            assert!(q.remove(seq).is_some() || seq == 50);
        }
        assert!(q.items.len() <= 2 * q.len() + 16);
        let rest: Vec<u64> = q.iter().map(|(s, _)| s).collect();
        assert_eq!(rest.len(), q.len());
        assert_eq!(rest.first(), Some(&10));
        assert_eq!(rest.last(), Some(&109));
        // Removing the ends trims tombstones behind them.
        for seq in 10..20 {
            q.remove(seq);
        }
        assert_eq!(q.front_seq(), Some(100));
        assert_eq!(q.drain().count(), 10);
        assert!(q.is_empty());
        assert_eq!(q.front_seq(), None);
    }
}
