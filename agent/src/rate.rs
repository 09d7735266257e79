//! A token bucket: `rate` tokens a second, holding at most `burst`. The per-caller read
//! limit (`server::limits`) and the per-vault call pace (`vault::keyvault`) both use it.
//!
//! It keeps no clock and takes no lock: callers pass `now` and hold their own mutex, so one
//! bucket type serves a map of many buckets and a single shared one, and tests can step
//! time by hand.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A rate or burst of 0 is taken as 1, so the bucket always refills.
    pub(crate) fn full(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate: f64::from(rate.max(1)), burst, tokens: burst, last: now }
    }

    /// Takes a token if one is there. If not, takes nothing and returns how long until one
    /// will be (a 429's `Retry-After`).
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Takes a token now or ahead of time: the bucket may go into debt, and the answer is
    /// how long the caller must wait before using its token (zero if it was there). Callers
    /// that reserve and then wait are spaced `1/rate` apart, in the order they reserved.
    pub(crate) fn reserve(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens < 0.0 { Duration::from_secs_f64(-self.tokens / self.rate) } else { Duration::ZERO }
    }

    /// When the bucket was last taken from (to forget idle ones).
    pub(crate) fn last_used(&self) -> Instant {
        self.last
    }

    fn refill(&mut self, now: Instant) {
        // `now` can trail `last` when callers read the clock before taking their lock.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn try_take_allows_the_burst_then_says_when_to_retry() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(10, 3, t0);
        for _ in 0..3 {
            assert_eq!(b.try_take(t0), Ok(()));
        }
        assert_eq!(b.try_take(t0), Err(ms(100)));
        assert_eq!(b.try_take(t0 + ms(40)), Err(ms(60)), "a refusal takes nothing");
        assert_eq!(b.try_take(t0 + ms(100)), Ok(()));
        assert_eq!(b.last_used(), t0 + ms(100));
    }

    #[test]
    fn refill_stops_at_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(10, 2, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.try_take(later), Ok(()));
        assert_eq!(b.try_take(later), Ok(()));
        assert!(b.try_take(later).is_err(), "a minute idle still holds only the burst");
    }

    #[test]
    fn reserve_queues_callers_one_interval_apart() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(4, 1, t0);
        assert_eq!(b.reserve(t0), Duration::ZERO);
        assert_eq!(b.reserve(t0), ms(250));
        assert_eq!(b.reserve(t0), ms(500));
        // Half a second later the debt is down to one token: the next waits 250 ms more.
        assert_eq!(b.reserve(t0 + ms(500)), ms(250));
    }

    #[test]
    fn a_clock_read_before_the_lock_does_not_add_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(1, 1, t0 + ms(10));
        assert_eq!(b.try_take(t0), Ok(()));
        assert!(b.try_take(t0 + ms(10)).is_err(), "time before the last take refills nothing");
        assert_eq!(b.last_used(), t0 + ms(10));
    }

    #[test]
    fn zero_rate_and_burst_count_as_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(0, 0, t0);
        assert_eq!(b.try_take(t0), Ok(()));
        assert_eq!(b.try_take(t0), Err(Duration::from_secs(1)));
    }
}
