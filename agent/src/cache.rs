//! The secret cache: one Key Vault call per secret per node, however many callers ask.
//!
//! - **Single flight**: concurrent misses for the same (vault, name, version) share one
//!   fetch (a `OnceCell` per key); its result or error goes to every waiter.
//! - **Refresh ahead**: a background task refreshes every cached secret each
//!   `refresh_interval` (± 10 % jitter, so a fleet does not refresh in lockstep). A read
//!   never waits for the vault once a value is cached.
//! - **Stale means stale**: a value is fresh for `refresh_interval` (with its jitter) after its
//!   last good fetch; the refresh starts a little before that (`refresh_lead`), so a working
//!   vault never lets a value go stale. Past it — a refresh failed, or is still retrying — the
//!   value is served marked stale; past `max_stale` since the last good fetch reads get 502,
//!   whether or not a refresh is still in flight. A 404 or a disabled secret is not
//!   transient: the value stops being served at once. Failing entries back off
//!   (1 s, 2 s, 4 s … capped at `refresh_interval`), so many failing secrets cause no storm.
//! - **Versions**: a new current version found by a refresh writes
//!   `secret.version_changed`, wakes long polls, and keeps the previous version readable by
//!   id for `version_grace`. Pinned versions are immutable and served from cache.
//! - **Memory**: values live only in `SecretValue` behind `Arc`; an evicted or replaced
//!   value is zeroized when its last reader drops it. Idle entries go after `evict_idle`.
//!   An entry is small (issue 19: ≤ 16 MiB RSS with 10,000 cached secrets): the current
//!   version and four timestamps, keyed by the lowercase name under its vault's alias (stored
//!   once per vault); what few entries need — a 404, a failing refresh, retired or pinned
//!   versions, a long poll's channel — sits behind one optional box, dropped again once
//!   empty. The name, version and metadata live once, in the shared `Fetched` (for a `local`
//!   vault, the very one its table holds).
//!
//! Never logs values; the audit records it writes carry names, versions and request ids.
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvbroker_proto::{CacheState, VaultAlias, VersionId};
use tokio::sync::{OnceCell, watch};

use crate::audit::Auditor;
use crate::config::CacheConfig;
use crate::vault::{Budget, Fetched, VaultError, Vaults};

mod fetch;
mod sweep;

/// Entries by vault alias, then by lowercase name.
type Entries = HashMap<VaultAlias, Names>;

/// One vault's entries, found by lowercase name. A `HashTable` rather than a map keyed by
/// the name: an entry's name is its current version's (`Fetched::name`), so most entries
/// store no name of their own (issue 19).
#[derive(Default)]
struct Names {
    table: hashbrown::HashTable<Entry>,
    hasher: std::collections::hash_map::RandomState,
}

impl Names {
    fn get_mut(&mut self, key: &str) -> Option<&mut Entry> {
        let hash = self.hasher.hash_one(key);
        self.table.find_mut(hash, |e| e.key() == key)
    }

    /// The entry for `key`, made if there is none.
    fn get_or_insert(&mut self, key: &str, now: Tick) -> &mut Entry {
        let hasher = &self.hasher;
        match self.table.entry(hasher.hash_one(key), |e| e.key() == key, |e| hasher.hash_one(e.key())) {
            hashbrown::hash_table::Entry::Occupied(o) => o.into_mut(),
            hashbrown::hash_table::Entry::Vacant(v) => v.insert(Entry::new(now, key)).into_mut(),
        }
    }
}
type FlightKey = (VaultAlias, String, Option<VersionId>, Budget);
type Flight = Arc<OnceCell<Result<Arc<Fetched>, VaultError>>>;

/// A value as served, and how.
pub(crate) struct Lookup {
    pub(crate) fetched: Arc<Fetched>,
    pub(crate) state: CacheState,
}

#[derive(Clone)]
pub(crate) struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Mutex<Entries>,
    flights: Mutex<HashMap<FlightKey, Flight>>,
    cfg: CacheConfig,
    /// Where [`Tick`]s count from.
    epoch: Instant,
    vaults: Arc<Vaults>,
    auditor: Arc<Auditor>,
}

struct Entry {
    /// The current version; `None` after a 404/disabled, or for pinned-only entries.
    current: Option<Arc<Fetched>>,
    last_read: Tick,
    last_good: Tick,
    /// `last_good` + the jittered `refresh_interval`: served as fresh until then.
    fresh_until: Tick,
    next_refresh: Tick,
    /// What most entries never need; `None` whenever all of it is empty.
    rare: Option<Box<Rare>>,
}

/// The parts of an entry that only a 404, a failing vault, a rotation, a read by version or
/// a long poll fill in.
#[derive(Default)]
struct Rare {
    /// The lowercase name the entry is filed under, when `current` does not hold it (no
    /// current version, or one the vault spelled differently).
    name: Option<Box<str>>,
    /// Why the secret is no longer served (404 or disabled), until a refresh finds it again.
    gone: Option<VaultError>,
    /// Versions replaced by a rotation, with when; readable by id until `version_grace`.
    retired: Vec<(Arc<Fetched>, Instant)>,
    /// Versions read by id.
    pinned: Vec<Arc<Fetched>>,
    failing_since: Option<Instant>,
    last_error: Option<String>,
    failures: u32,
    /// Wakes long polls; created by the first long poll.
    changed: Option<watch::Sender<Option<VersionId>>>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.gone.is_none()
            && self.retired.is_empty()
            && self.pinned.is_empty()
            && self.failing_since.is_none()
            && self.last_error.is_none()
            && self.failures == 0
            && self.changed.is_none()
    }
}

impl Entry {
    fn new(now: Tick, key: &str) -> Self {
        let rare = Rare { name: Some(key.into()), ..Rare::default() };
        Self {
            current: None,
            last_read: now,
            last_good: now,
            fresh_until: now,
            next_refresh: now,
            rare: Some(Box::new(rare)),
        }
    }

    /// The lowercase name the entry is filed under. Never changes while it is filed: the
    /// name is kept in `rare` before `current` is cleared or holds another spelling.
    fn key(&self) -> &str {
        match (self.rare.as_ref().and_then(|r| r.name.as_deref()), &self.current) {
            (Some(name), _) => name,
            (None, Some(f)) => f.name.key(),
            (None, None) => "",
        }
    }

    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Drops the rare parts once none is in use (the name too, once `current` holds it).
    fn tidy(&mut self) {
        if let (Some(r), Some(f)) = (&mut self.rare, &self.current)
            && r.name.as_deref() == Some(f.name.key())
        {
            r.name = None;
        }
        if self.rare.as_ref().is_some_and(|r| r.is_empty()) {
            self.rare = None;
        }
    }

    fn gone(&self) -> Option<&VaultError> {
        self.rare.as_ref()?.gone.as_ref()
    }

    fn failing_since(&self) -> Option<Instant> {
        self.rare.as_ref()?.failing_since
    }

    fn last_error(&self) -> Option<&String> {
        self.rare.as_ref()?.last_error.as_ref()
    }

    fn retired_count(&self) -> usize {
        self.rare.as_ref().map_or(0, |r| r.retired.len())
    }

    /// Served marked stale: a refresh failed, or none has succeeded in time.
    fn is_stale(&self, now: Tick) -> bool {
        self.current.is_some() && (self.failing_since().is_some() || now > self.fresh_until)
    }

    fn find_version(&self, v: &VersionId) -> Option<&Arc<Fetched>> {
        let (retired, pinned) = match &self.rare {
            Some(r) => (&r.retired[..], &r.pinned[..]),
            None => (&[][..], &[][..]),
        };
        self.current
            .iter()
            .chain(retired.iter().map(|(f, _)| f))
            .chain(pinned.iter())
            .find(|f| f.version == *v)
    }
}

/// One cached secret, for `kvbroker ctl status`. Never a value.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct EntryStatus {
    pub(crate) vault: String,
    pub(crate) name: String,
    pub(crate) version: Option<String>,
    pub(crate) age_secs: u64,
    pub(crate) idle_secs: u64,
    pub(crate) stale: bool,
    pub(crate) retired_versions: usize,
    pub(crate) last_error: Option<String>,
}

fn jitter(d: Duration) -> Duration {
    // ±10 %, so refreshes across a fleet spread out. Checked: no configured duration may
    // panic a task (config bounds durations, and this holds even without that bound).
    Duration::try_from_secs_f64(d.as_secs_f64() * (0.9 + fastrand::f64() * 0.2)).unwrap_or(d)
}

/// A point in time as nanoseconds since the cache was made: 8 bytes where an `Instant` takes
/// 16, for the four timestamps of every entry (issue 19). Lasts 584 years; arithmetic
/// saturates instead of panicking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Tick(u64);

impl Tick {
    /// `self + d`.
    fn after(self, d: Duration) -> Tick {
        Tick(self.0.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }

    /// How long after `earlier` this is (zero if it is not after it).
    fn since(self, earlier: Tick) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// How long before a value goes stale its refresh starts: one sweep tick and a second for the
/// call itself, but at most half the interval.
fn refresh_lead(interval: Duration) -> Duration {
    (sweep_tick(interval) + Duration::from_secs(1)).min(interval / 2)
}

/// How often the refresher sweeps: a tenth of the interval, 0.1–1 s.
fn sweep_tick(interval: Duration) -> Duration {
    (interval / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

impl Cache {
    pub(crate) fn new(cfg: CacheConfig, vaults: Arc<Vaults>, auditor: Arc<Auditor>) -> Self {
        let inner = Inner {
            entries: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            cfg,
            epoch: Instant::now(),
            vaults,
            auditor,
        };
        Self { inner: Arc::new(inner) }
    }

    pub(crate) fn vaults(&self) -> &Vaults {
        &self.inner.vaults
    }

    /// Now, as a [`Tick`].
    fn now(&self) -> Tick {
        Tick(u64::try_from(self.inner.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
