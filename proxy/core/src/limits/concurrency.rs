//! [`ConcurrencyLimit`]: at most `max` requests in flight.

/// Counts requests in flight against a maximum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConcurrencyLimit {
    max: u32,
    in_flight: u32,
}

/// One request's slot in a [`ConcurrencyLimit`]; give it back with [`ConcurrencyLimit::release`].
///
/// Only `try_acquire` makes one and it is neither `Clone` nor `Copy`, so a
/// slot cannot be released twice or released without being held.
#[must_use = "a permit holds a concurrency slot until it is released"]
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    _private: (),
}

/// All slots are taken: retry when a request in flight completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{max} requests already in flight")]
pub struct ConcurrencyFull {
    /// The limit.
    pub max: u32,
}

impl ConcurrencyLimit {
    /// A limit of `max` requests in flight, none taken.
    pub fn new(max: u32) -> Self {
        Self { max, in_flight: 0 }
    }

    /// Whether a slot is free now.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.max
    }

    /// Takes a slot.
    pub fn try_acquire(&mut self) -> Result<Permit, ConcurrencyFull> {
        if !self.has_room() {
            return Err(ConcurrencyFull { max: self.max });
        }
        self.in_flight += 1;
        Ok(Permit { _private: () })
    }

    /// Gives a slot back.
    ///
    /// The permit must come from this limit; one from another limit is a bug
    /// (caught by a debug assertion when this limit has none in flight).
    #[expect(
        clippy::needless_pass_by_value,
        reason = "taking the permit by value is the point: it cannot be released twice"
    )]
    pub fn release(&mut self, permit: Permit) {
        let Permit { _private: () } = permit;
        debug_assert!(
            self.in_flight > 0,
            "released a permit this limit never issued"
        );
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// A limit of `max` with this one's requests still in flight (their
    /// permits are released into the new limit). It may start over `max`
    /// when the limit shrank: no new request passes until enough finish.
    #[must_use]
    pub fn resized(&self, max: u32) -> Self {
        Self {
            max,
            in_flight: self.in_flight,
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// The limit.
    pub fn max(&self) -> u32 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_max_then_refuses_until_a_release() {
        let mut c = ConcurrencyLimit::new(2);
        let a = c.try_acquire().unwrap();
        let b = c.try_acquire().unwrap();
        assert_eq!(c.try_acquire(), Err(ConcurrencyFull { max: 2 }));
        c.release(a);
        assert_eq!(c.in_flight(), 1);
        let d = c.try_acquire().unwrap();
        c.release(b);
        c.release(d);
        assert_eq!(c.in_flight(), 0);
    }
}
