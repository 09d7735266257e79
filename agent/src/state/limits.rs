//! Per-caller limits, so one runaway job cannot starve the node: a token bucket per uid (or
//! per policy rule) for reads, answering 429 with `Retry-After`, and a cap on open
//! connections per uid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{LimitsConfig, RateKey};
use crate::rate::TokenBucket;

pub(crate) struct Limits {
    cfg: LimitsConfig,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    conns: Mutex<HashMap<u32, usize>>,
}

/// Held while a connection is open; releases its slot when dropped.
pub(crate) struct ConnSlot {
    limits: Arc<Limits>,
    uid: u32,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut conns = self.limits.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = conns.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                conns.remove(&self.uid);
            }
        }
    }
}

impl Limits {
    pub(crate) fn new(cfg: LimitsConfig) -> Arc<Self> {
        Arc::new(Self { cfg, buckets: Mutex::new(HashMap::new()), conns: Mutex::new(HashMap::new()) })
    }

    pub(crate) fn key(&self) -> RateKey {
        self.cfg.rate_key
    }

    /// A connection slot for `uid`, or `None` when it already has `connections_per_uid` open.
    pub(crate) fn open(self: &Arc<Self>, uid: u32) -> Option<ConnSlot> {
        let mut conns = self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = conns.entry(uid).or_default();
        if *n >= self.cfg.connections_per_uid {
            return None;
        }
        *n += 1;
        Some(ConnSlot { limits: Arc::clone(self), uid })
    }

    /// Takes one read from `key`'s bucket; `Err(retry_after)` when it is empty.
    pub(crate) fn take(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > 65_536 {
            // Forget idle callers rather than grow without bound.
            buckets.retain(|_, b| now.duration_since(b.last_used()) < Duration::from_secs(60));
        }
        buckets
            .entry(key.to_owned())
            .or_insert_with(|| TokenBucket::full(self.cfg.rate_per_second, self.cfg.burst, now))
            .try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u32, burst: u32, conns: usize) -> Arc<Limits> {
        Limits::new(LimitsConfig {
            rate_per_second: rate,
            burst,
            rate_key: RateKey::Uid,
            connections_per_uid: conns,
        })
    }

    #[test]
    fn bucket_allows_burst_then_refuses_with_retry_after() {
        let l = limits(10, 3, 1);
        for _ in 0..3 {
            assert!(l.take("1000").is_ok());
        }
        let wait = l.take("1000").unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        assert!(l.take("2000").is_ok(), "other callers have their own bucket");
    }

    #[test]
    fn connection_cap_per_uid() {
        let l = limits(10, 10, 2);
        let a = l.open(5).unwrap();
        let _b = l.open(5).unwrap();
        assert!(l.open(5).is_none());
        assert!(l.open(6).is_some());
        drop(a);
        assert!(l.open(5).is_some());
    }
}
