//! Per-caller limits, so one runaway job cannot starve the node: a token bucket per uid (or
//! per policy rule) for reads, answering 429 with `Retry-After`, and connection budgets.
//!
//! Connections: every open connection costs file descriptors (the socket, and a pidfd), so
//! the number the agent holds is bounded by a **global budget** derived from
//! `RLIMIT_NOFILE` ([`conn_budget`]). No single uid may take all of it: a uid's cap is
//! `connections_per_uid` but at most the budget less a **reserve** kept for everyone else.
//! When a uid at its cap opens another connection, its **longest-idle** connection (no
//! request in flight) is closed to make room, so leaked idle connections never lock the
//! uid's other processes out. Only when all its connections are busy is the new one refused:
//! it is answered 429 and closed (at most [`REFUSING_PER_UID`] such connections per uid are
//! held while they get their answer; past that, or past the global budget, a connection is
//! closed at once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::{LimitsConfig, RateKey};
use crate::rate::TokenBucket;

/// Over-cap connections of one uid held at once while they get their 429.
pub(crate) const REFUSING_PER_UID: usize = 8;
/// File descriptors kept for everything that is not a client connection: the audit log,
/// vault connections, `/proc` reads, per-request sender pidfds, the admin socket's budget.
const FDS_RESERVED: u64 = 256;
/// File descriptors one client connection costs (the socket and the caller's pidfd).
const FDS_PER_CONN: u64 = 2;

/// Connections the agent socket may hold at once, given the fd limit in force.
pub(crate) fn conn_budget(nofile: u64) -> usize {
    let n = nofile.saturating_sub(FDS_RESERVED) / FDS_PER_CONN;
    usize::try_from(n).unwrap_or(usize::MAX).clamp(16, 1 << 20)
}

pub(crate) struct Limits {
    cfg: LimitsConfig,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    conns: Mutex<Conns>,
    budget: usize,
    uid_cap: usize,
}

#[derive(Default)]
struct Conns {
    /// Every connection held, served or being refused.
    total: usize,
    next_id: u64,
    uids: HashMap<u32, UidConns>,
}

#[derive(Default)]
struct UidConns {
    served: HashMap<u64, Arc<Activity>>,
    refusing: usize,
}

/// What a connection is doing, for choosing the longest-idle one to close.
pub(crate) struct Activity {
    in_flight: AtomicU32,
    /// Nanoseconds since `epoch` of the last request's end (or the connection's start).
    last_active: AtomicU64,
    epoch: Instant,
    evicted: AtomicBool,
    evict: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            last_active: AtomicU64::new(0),
            epoch: Instant::now(),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    fn touch(&self) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_active.store(ns, Ordering::Relaxed);
    }

    fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_active.load(Ordering::Relaxed))
    }

    /// Marks a request in flight until the guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        crate::metrics::get().busy(true);
        // No stamp here: a busy connection is never chosen, and the end of its request
        // stamps it (one clock read per request, not two).
        Busy(Arc::clone(self))
    }

    /// Resolves when the connection has been chosen to give way to a newer one.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await;
    }
}

/// A request in flight on a connection.
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        crate::metrics::get().busy(false);
    }
}

/// How a new connection is admitted.
pub(crate) enum Admit {
    /// Served normally.
    Served(ConnSlot),
    /// Over its uid's cap with every connection busy: answer 429 and close.
    Refused(ConnSlot),
    /// No room at all: close at once.
    Closed,
}

/// Held while a connection is open; releases its place when dropped.
pub(crate) struct ConnSlot {
    limits: Arc<Limits>,
    uid: u32,
    /// `Some` for a served connection: its id and activity.
    served: Option<(u64, Arc<Activity>)>,
}

impl ConnSlot {
    fn new(limits: Arc<Limits>, uid: u32, served: Option<(u64, Arc<Activity>)>) -> Self {
        crate::metrics::get().conn_opened(served.is_none());
        Self { limits, uid, served }
    }

    pub(crate) fn activity(&self) -> Option<&Arc<Activity>> {
        self.served.as_ref().map(|(_, a)| a)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        crate::metrics::get().conn_closed(self.served.is_none());
        let mut conns = self.limits.conns();
        conns.total = conns.total.saturating_sub(1);
        let Some(u) = conns.uids.get_mut(&self.uid) else { return };
        match &self.served {
            // An evicted connection gave its place to a newer one already.
            Some((id, _)) => {
                u.served.remove(id);
            }
            None => u.refusing = u.refusing.saturating_sub(1),
        }
        if u.served.is_empty() && u.refusing == 0 {
            conns.uids.remove(&self.uid);
        }
    }
}

impl Limits {
    /// `budget`: connections the agent socket may hold at once ([`conn_budget`]).
    pub(crate) fn new(cfg: LimitsConfig, budget: usize) -> Arc<Self> {
        // The reserve: a quarter of the budget (at least 8) no single uid can take.
        let reserve = (budget / 4).max(8);
        let uid_cap = cfg.connections_per_uid.min(budget.saturating_sub(reserve + REFUSING_PER_UID)).max(1);
        Arc::new(Self {
            cfg,
            buckets: Mutex::new(HashMap::new()),
            conns: Mutex::new(Conns::default()),
            budget,
            uid_cap,
        })
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn key(&self) -> RateKey {
        self.cfg.rate_key
    }

    /// (global budget, per-uid cap), for the startup log and docs.
    pub(crate) fn budgets(&self) -> (usize, usize) {
        (self.budget, self.uid_cap)
    }

    /// Admits a new connection of `uid`: served (closing its longest-idle connection if it
    /// is at its cap), refused with 429, or closed at once.
    pub(crate) fn open(self: &Arc<Self>, uid: u32) -> Admit {
        let mut guard = self.conns();
        let conns = &mut *guard;
        if conns.total >= self.budget {
            return Admit::Closed;
        }
        conns.next_id += 1;
        let id = conns.next_id;
        let u = conns.uids.entry(uid).or_default();
        if u.served.len() >= self.uid_cap {
            let idle = u
                .served
                .iter()
                .filter(|(_, a)| a.in_flight.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, a)| a.idle_since())
                .map(|(id, _)| *id);
            match idle {
                Some(old) => {
                    if let Some(a) = u.served.remove(&old) {
                        a.evicted.store(true, Ordering::Release);
                        a.evict.notify_one();
                    }
                }
                None if u.refusing < REFUSING_PER_UID => {
                    u.refusing += 1;
                    conns.total += 1;
                    return Admit::Refused(ConnSlot::new(Arc::clone(self), uid, None));
                }
                None => return Admit::Closed,
            }
        }
        let a = Arc::new(Activity::new());
        a.touch();
        u.served.insert(id, Arc::clone(&a));
        conns.total += 1;
        Admit::Served(ConnSlot::new(Arc::clone(self), uid, Some((id, a))))
    }

    /// Takes one read from `key`'s bucket; `Err(retry_after)` when it is empty.
    pub(crate) fn take(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() > 65_536 {
            // Forget idle callers rather than grow without bound.
            buckets.retain(|_, b| now.duration_since(b.last_used()) < Duration::from_secs(60));
        }
        // A known caller's key is looked up without copying it (a read's hot path).
        if let Some(b) = buckets.get_mut(key) {
            return b.try_take(now);
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
        Limits::new(
            LimitsConfig { rate_per_second: rate, burst, rate_key: RateKey::Uid, connections_per_uid: conns },
            1000,
        )
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

    fn served(a: Admit) -> ConnSlot {
        match a {
            Admit::Served(s) => s,
            _ => panic!("not served"),
        }
    }

    /// Issue 13: a uid at its cap whose connections are busy gets 429 (a few at once), then
    /// closed connections; other uids are unaffected; a closed one frees its place.
    #[test]
    fn connection_cap_per_uid() {
        let l = limits(10, 10, 2);
        let a = served(l.open(5));
        let b = served(l.open(5));
        let (_ba, _bb) = (a.activity().unwrap().begin(), b.activity().unwrap().begin());
        let refused: Vec<_> = (0..REFUSING_PER_UID).map(|_| l.open(5)).collect();
        assert!(refused.iter().all(|r| matches!(r, Admit::Refused(_))));
        assert!(matches!(l.open(5), Admit::Closed));
        assert!(matches!(l.open(6), Admit::Served(_)));
        drop((_ba, a));
        assert!(matches!(l.open(5), Admit::Served(_)));
    }

    /// Issue 13: one worker leaking idle connections locked its uid's other processes out.
    /// At the cap, the longest-idle connection gives way; a busy one never does.
    #[tokio::test]
    async fn longest_idle_connection_gives_way() {
        let l = limits(10, 10, 3);
        let oldest = served(l.open(7));
        let busy_old = served(l.open(7));
        let _busy = busy_old.activity().unwrap().begin();
        let newer = served(l.open(7));
        oldest.activity().unwrap().touch();
        std::thread::sleep(Duration::from_millis(5));
        newer.activity().unwrap().touch();
        let fresh = served(l.open(7));
        tokio::time::timeout(Duration::from_secs(1), oldest.activity().unwrap().evicted()).await.unwrap();
        assert!(!newer.activity().unwrap().evicted.load(Ordering::Acquire));
        assert!(!busy_old.activity().unwrap().evicted.load(Ordering::Acquire));
        drop(oldest);
        assert_eq!(l.conns().uids[&7].served.len(), 3, "the evicted one's place went to the fresh one");
        drop((fresh, newer));
        assert_eq!(l.conns().uids[&7].served.len(), 1);
    }

    #[test]
    fn no_uid_can_take_the_reserve() {
        let l = Limits::new(
            LimitsConfig {
                rate_per_second: 1,
                burst: 1,
                rate_key: RateKey::Uid,
                connections_per_uid: 100_000,
            },
            conn_budget(1024),
        );
        let (budget, cap) = l.budgets();
        assert_eq!(budget, 384);
        assert!(cap + REFUSING_PER_UID <= budget - budget / 4, "{cap} of {budget}");
    }
}
